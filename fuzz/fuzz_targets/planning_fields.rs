//! The planning path on JPEGs built from fuzzed EXIF field values (boundary dates, offsets,
//! rationals, references; see `relay_fuzz::planning::Fields`): reaches the date/time and
//! coordinate arithmetic that raw bytes rarely get through the TIFF structure to.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    relay_fuzz::planning::run_fields(data);
});
