//! Bounded mutation fuzzing of zip-and-push's planning path (EXIF head walk → metadata → sequence
//! rules and MAP* descriptions → header rewrite → zip plan) on the stable toolchain, as an ordinary
//! test (~5 s per generator; `PLANNING_FUZZ_SECS` overrides). The libFuzzer targets
//! `planning_path` and `planning_fields` in `fuzz/` run the same harness (`fuzz/src/planning.rs`,
//! included below) much longer.
//!
//! Inputs: geotagged fixture JPEGs (both byte orders, DateTimeOriginal with offsets, a capture
//! time at 9999-12-31 with a negative offset, Exif after DQT, several files per input) mutated
//! byte-wise, and structured EXIF field values. A panic — the harness's own invariants included —
//! fails the test with the seed that reproduces it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use relay_fixtures::{jpeg, ImageSpec, TimeTags};
use time::macros::datetime;

#[path = "../../fuzz/src/planning.rs"]
mod planning;

// `planning.rs` reaches the domain as `crate::domain` (declared in main.rs), as in the fuzz crate.

use crate::rng;
use rng::Rng;

fn budget() -> Duration {
    let secs = std::env::var("PLANNING_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(5);
    Duration::from_secs(secs)
}

fn spec() -> ImageSpec {
    ImageSpec::new(50.8966, -0.5591, datetime!(2024-05-01 10:00:00.257 UTC))
}

/// Replace the first occurrence of `from` in `bytes` by `to` (same length).
fn patch(mut bytes: Vec<u8>, from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("pattern in the fixture");
    bytes[at..at + to.len()].copy_from_slice(to);
    bytes
}

/// The seed files of `planning_path` (also written to `fuzz/seeds/planning_path`).
fn path_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let plain = jpeg(&spec());
    let big = {
        let mut s = spec();
        s.big_endian = true;
        s.altitude = Some(-12.5);
        s.heading = Some(133.54);
        s.time_tags = TimeTags::DateTimeOriginal {
            offset: Some("+02:00".into()),
        };
        jpeg(&s)
    };
    let next = {
        let mut s = spec();
        s.lat += 0.000_05;
        s.captured_at += time::Duration::seconds(1);
        s.seed = 1;
        jpeg(&s)
    };
    // Issue 15's file: DateTimeOriginal 9999:12:31 23:59:59 with OffsetTimeOriginal -01:00.
    let year_9999 = {
        let mut s = spec();
        s.time_tags = TimeTags::DateTimeOriginal {
            offset: Some("-01:00".into()),
        };
        patch(jpeg(&s), b"2024:05:01 09:00:00", b"9999:12:31 23:59:59")
    };
    // The Exif APP1 after a DQT segment.
    let after_dqt = {
        let mut out = vec![0xFF, 0xD8, 0xFF, 0xDB, 0x00, 0x43, 0x00];
        out.extend(1..=64u8);
        out.extend_from_slice(&plain[2..]);
        out
    };
    let mut two = plain.clone();
    two.extend_from_slice(planning::NEXT_FILE);
    two.extend_from_slice(&next);
    vec![
        ("plain.jpg", plain),
        ("big_endian_dto.jpg", big),
        ("two_images.bin", two),
        ("year_9999_offset.jpg", year_9999),
        ("exif_after_dqt.jpg", after_dqt),
    ]
}

/// JPEG-flavoured byte mutations: flips, marker bytes, cuts, splices, file separators.
fn mutate(data: &mut Vec<u8>, rng: &mut Rng, donors: &[Vec<u8>]) {
    const INTERESTING: &[u8] = &[
        0x00, 0xFF, 0xD8, 0xD9, 0xDA, 0xDB, 0xE0, 0xE1, 0xFE, 0x01, 0x7F, 0x80,
    ];
    for _ in 0..=rng.below(4) {
        let len = data.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 => data.truncate(rng.below(len + 1)),
            3 => {
                let i = rng.below(len + 1);
                let bytes: Vec<u8> = (0..=rng.below(8)).map(|_| rng.next() as u8).collect();
                data.splice(i..i, bytes);
            }
            4 if len > 1 => {
                let a = rng.below(len);
                let b = a + rng.below(len - a);
                data.drain(a..b);
            }
            5 => {
                let i = rng.below(len + 1);
                data.splice(i..i, planning::NEXT_FILE.iter().copied());
            }
            _ => {
                let donor = &donors[rng.below(donors.len())];
                if !donor.is_empty() {
                    let a = rng.below(donor.len());
                    let b = a + rng.below(donor.len() - a) + 1;
                    let i = rng.below(data.len() + 1);
                    data.splice(i..i, donor[a..b].iter().copied());
                }
            }
        }
    }
}

/// Run `check` on generated inputs until the time budget is spent; report the reproducer.
fn run(name: &str, mut make: impl FnMut(&mut Rng) -> Vec<u8>, check: impl Fn(&[u8])) -> u64 {
    let start = Instant::now();
    let mut runs = 0u64;
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    while start.elapsed() < budget() {
        seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut rng = Rng(seed | 1);
        let input = make(&mut rng);
        if catch_unwind(AssertUnwindSafe(|| check(&input))).is_err() {
            // The input as a file, to replay with the libFuzzer target or `run_bytes`.
            let path = std::env::temp_dir().join(format!("{name}-{seed:x}.bin"));
            let saved = std::fs::write(&path, &input).map(|()| path.display().to_string());
            panic!(
                "{name}: panic on the input from seed {seed:#x} ({} bytes), saved: {saved:?}",
                input.len()
            );
        }
        runs += 1;
    }
    runs
}

#[test]
fn seeds_plan_without_panics() {
    for (name, bytes) in path_seeds() {
        if catch_unwind(AssertUnwindSafe(|| planning::run_bytes(&bytes))).is_err() {
            panic!("planning_path seed {name}");
        }
    }
    for (k, bytes) in planning::field_seeds().iter().enumerate() {
        if catch_unwind(AssertUnwindSafe(|| planning::run_fields(bytes))).is_err() {
            panic!("planning_fields seed {k}: {bytes:?}");
        }
    }
}

#[test]
fn planning_path_never_panics_on_mutated_files() {
    let donors: Vec<Vec<u8>> = path_seeds().into_iter().map(|(_, b)| b).collect();
    let runs = run(
        "planning_path",
        |rng| {
            let mut bytes = donors[rng.below(donors.len())].clone();
            for _ in 0..=rng.below(3) {
                mutate(&mut bytes, rng, &donors);
            }
            bytes
        },
        planning::run_bytes,
    );
    assert!(runs > 100, "only {runs} inputs in the time budget");
    eprintln!("planning_path: {runs} inputs");
}

#[test]
fn planning_fields_never_panics_on_generated_exif() {
    let seeds = planning::field_seeds();
    let runs = run(
        "planning_fields",
        |rng| {
            let mut bytes = seeds[rng.below(seeds.len())].clone();
            // Selectors mostly within the template lists, sometimes raw values from the pool.
            for b in bytes.iter_mut().skip(1) {
                if rng.below(3) == 0 {
                    *b = match rng.below(4) {
                        0 => 255,
                        1 => rng.next() as u8,
                        _ => rng.below(16) as u8,
                    };
                }
            }
            bytes[0] = rng.below(4) as u8;
            bytes.extend((0..rng.below(96)).map(|_| rng.next() as u8));
            if rng.below(4) == 0 {
                bytes.extend_from_slice(planning::NEXT_FILE);
                bytes.extend((0..rng.below(40)).map(|_| rng.below(12) as u8));
            }
            bytes
        },
        planning::run_fields,
    );
    assert!(runs > 100, "only {runs} inputs in the time budget");
    eprintln!("planning_fields: {runs} inputs");
}

/// Writes the libFuzzer seed corpora of `planning_path` and `planning_fields` (run on demand:
/// `cargo test -p shared --test integration -- --ignored domain_planning_fuzz::write_fuzz_seeds`).
#[test]
#[ignore = "writes files under fuzz/seeds"]
fn write_fuzz_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
    let path = dir.join("planning_path");
    std::fs::create_dir_all(&path).expect("mkdir");
    for (name, bytes) in path_seeds() {
        std::fs::write(path.join(name), bytes).expect("write");
    }
    let fields = dir.join("planning_fields");
    std::fs::create_dir_all(&fields).expect("mkdir");
    for (k, bytes) in planning::field_seeds().iter().enumerate() {
        std::fs::write(fields.join(format!("fields_{k:03}.bin")), bytes).expect("write");
    }
}
