//! Pure domain logic. Nothing in here performs I/O or names an AWS type.

pub mod description;
pub mod exif;
pub mod jpeg;
pub mod linking;
pub mod sequence;
pub mod tiles;
pub mod toolszip;
pub mod tracking;
pub mod zipfmt;
