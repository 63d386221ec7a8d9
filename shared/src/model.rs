//! Records the functions keep about sequences, uploads and images (in progress).
