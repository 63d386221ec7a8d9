//! zip-and-push's planning path on raw bytes: files (split at `NEXTJPEG`) → EXIF head walk →
//! metadata → sequence rules and MAP* descriptions → header rewrite → zip plan. Every input ends
//! in a plan or in recorded rejections: no panic, no overflow, no broken invariant.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    relay_fuzz::planning::run_bytes(data);
});
