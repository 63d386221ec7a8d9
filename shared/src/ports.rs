//! Ports: one small trait per capability the functions need (in progress).
