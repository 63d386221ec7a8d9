//! Linking (shared::domain::linking): Plan B by order, Plan A by matching, and their agreement.

use shared::domain::linking::{
    link_by_order, match_candidates, DropReason, ImageOutcome, LinkError, LinkPath, MapillaryImage,
    MapillarySequence, OurImage, Tolerances,
};

const T0: i64 = 1_683_629_036_000;
/// ~1.1 m of latitude.
const STEP_DEG: f64 = 0.000_01;

/// `n` images 2 s and ~11 m apart heading north.
fn ours(n: usize) -> Vec<OurImage> {
    (0..n)
        .map(|k| OurImage {
            key: format!("img_{k:03}.jpg"),
            lat: 41.0 + STEP_DEG * 10.0 * k as f64,
            lon: 2.0,
            altitude: Some(100.0 + k as f64),
            captured_at_ms: T0 + 2_000 * k as i64,
            heading: Some(0.0),
        })
        .collect()
}

/// Mapillary's copy of one of ours (exact position and time, as uploaded).
fn theirs(o: &OurImage, id: &str, seq: &str) -> MapillaryImage {
    MapillaryImage {
        id: id.to_string(),
        sequence_id: seq.to_string(),
        captured_at_ms: o.captured_at_ms,
        lon: o.lon,
        lat: o.lat,
        altitude: o.altitude,
    }
}

fn seq(id: &str, images: Vec<MapillaryImage>) -> MapillarySequence {
    MapillarySequence {
        id: id.to_string(),
        images,
    }
}

fn linked_id(o: &ImageOutcome) -> Option<&str> {
    match o {
        ImageOutcome::Linked { image_id, .. } => Some(image_id),
        ImageOutcome::Dropped { .. } => None,
    }
}

#[test]
fn when_everything_arrived_should_link_in_order() {
    let ours = ours(5);
    let s = seq(
        "S1",
        ours.iter()
            .enumerate()
            .map(|(k, o)| theirs(o, &format!("{}", 900 + k), "S1"))
            .collect(),
    );
    let r = link_by_order(&ours, &[s], &Tolerances::default()).expect("links");
    assert_eq!(r.path, LinkPath::ActivityFeed);
    assert_eq!(r.sequence_ids, ["S1"]);
    assert_eq!(r.linked_count(), 5);
    let links: Vec<(&str, &str)> = r.links().collect();
    assert_eq!(links[0], ("img_000.jpg", "900"));
    assert_eq!(links[4], ("img_004.jpg", "904"));
    match &r.images[2].outcome {
        ImageOutcome::Linked {
            link, sequence_id, ..
        } => {
            assert_eq!(link, "https://www.mapillary.com/app/?pKey=902");
            assert_eq!(sequence_id, "S1");
        }
        other => panic!("{other:?}"),
    }
    assert!(r.unmatched_mapillary.is_empty());
}

#[test]
fn when_mapillary_dropped_images_should_report_them_and_keep_the_rest_aligned() {
    let ours = ours(6);
    // Mapillary dropped #1 and #4; its timestamps are rounded to the second (+400 ms) and its
    // positions are 2 m off: within the default 1 s / 5 m.
    let imgs = [0, 2, 3, 5]
        .iter()
        .map(|&k| {
            let mut m = theirs(&ours[k], &format!("m{k}"), "S1");
            m.captured_at_ms += 400;
            m.lat += 2.0 / 111_195.0;
            m
        })
        .collect();
    let r = link_by_order(&ours, &[seq("S1", imgs)], &Tolerances::default()).expect("links");
    let got: Vec<Option<&str>> = r.images.iter().map(|i| linked_id(&i.outcome)).collect();
    assert_eq!(got, [Some("m0"), None, Some("m2"), Some("m3"), None, Some("m5")]);
    assert_eq!(
        r.images[1].outcome,
        ImageOutcome::Dropped {
            reason: DropReason::NotInSequence
        }
    );
    assert_eq!(r.dropped_count(), 2);
    assert_eq!(r.mismatches().count(), 0);
}

#[test]
fn when_positions_disagree_should_report_a_mismatch_not_a_link() {
    let ours = ours(3);
    let mut imgs: Vec<MapillaryImage> = ours
        .iter()
        .enumerate()
        .map(|(k, o)| theirs(o, &format!("m{k}"), "S1"))
        .collect();
    imgs[1].lat += 50.0 / 111_195.0; // 50 m away
    let r = link_by_order(&ours, &[seq("S1", imgs.clone())], &Tolerances::default()).expect("links");
    assert_eq!(r.linked_count(), 2);
    let mism: Vec<(&str, &DropReason)> = r.mismatches().collect();
    assert_eq!(mism.len(), 1);
    assert_eq!(mism[0].0, "img_001.jpg");
    match mism[0].1 {
        DropReason::Mismatch {
            image_id,
            distance_m,
            time_delta_ms,
            ..
        } => {
            assert_eq!(image_id, "m1");
            assert!((distance_m - 50.0).abs() < 0.5, "{distance_m}");
            assert_eq!(*time_delta_ms, 0);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(r.unmatched_mapillary, ["m1"]);
    // A looser distance tolerance (configurable) accepts it.
    let loose = Tolerances {
        distance_m: 60.0,
        ..Tolerances::default()
    };
    let r = link_by_order(&ours, &[seq("S1", imgs.clone())], &loose).expect("links");
    assert_eq!(r.linked_count(), 3);
    // A capture time 1.5 s off fails the default 1 s tolerance.
    imgs[1].lat = ours[1].lat;
    imgs[1].captured_at_ms += 1_500;
    let r = link_by_order(&ours, &[seq("S1", imgs)], &Tolerances::default()).expect("links");
    assert_eq!(r.linked_count(), 2);
    assert_eq!(r.mismatches().count(), 1);
}

#[test]
fn when_altitude_tolerance_is_set_should_check_altitude() {
    let ours = ours(2);
    let mut imgs: Vec<MapillaryImage> = ours
        .iter()
        .enumerate()
        .map(|(k, o)| theirs(o, &format!("m{k}"), "S1"))
        .collect();
    imgs[0].altitude = Some(300.0);
    let default = link_by_order(&ours, &[seq("S1", imgs.clone())], &Tolerances::default()).expect("links");
    assert_eq!(default.linked_count(), 2, "altitude is not compared by default");
    let strict = Tolerances {
        altitude_m: Some(20.0),
        ..Tolerances::default()
    };
    let r = link_by_order(&ours, &[seq("S1", imgs)], &strict).expect("links");
    assert_eq!(r.linked_count(), 1);
}

#[test]
fn when_a_cluster_became_several_sequences_should_link_across_all() {
    let ours = ours(8);
    // Mapillary split the cluster into three sequences; listed out of capture order.
    let mk = |ks: &[usize], s: &str| -> MapillarySequence {
        seq(
            s,
            ks.iter()
                .map(|&k| theirs(&ours[k], &format!("{s}-{k}"), s))
                .collect(),
        )
    };
    let sequences = [mk(&[5, 6, 7], "C"), mk(&[0, 1, 2], "A"), mk(&[3, 4], "B")];
    let r = link_by_order(&ours, &sequences, &Tolerances::default()).expect("links");
    assert_eq!(r.linked_count(), 8);
    assert_eq!(r.sequence_ids, ["A", "B", "C"]);
    let ids: Vec<&str> = r.links().map(|(_, id)| id).collect();
    assert_eq!(ids, ["A-0", "A-1", "A-2", "B-3", "B-4", "C-5", "C-6", "C-7"]);
}

#[test]
fn when_images_are_close_together_should_pick_the_exact_ones() {
    // Two of ours 400 ms and 1 m apart (walking); Mapillary dropped the first. Order alone
    // would pair it with the second's image; the cost tie-break keeps the exact pair.
    let mut o = ours(3);
    o[1].captured_at_ms = o[0].captured_at_ms + 400;
    o[1].lat = o[0].lat + STEP_DEG;
    let imgs = vec![theirs(&o[1], "m1", "S"), theirs(&o[2], "m2", "S")];
    let r = link_by_order(&o, &[seq("S", imgs)], &Tolerances::default()).expect("links");
    let got: Vec<Option<&str>> = r.images.iter().map(|i| linked_id(&i.outcome)).collect();
    assert_eq!(got, [None, Some("m1"), Some("m2")]);
}

#[test]
fn when_input_is_inconsistent_should_refuse() {
    let o = ours(2);
    let wrong_seq = seq("S", vec![theirs(&o[0], "m0", "OTHER")]);
    assert!(matches!(
        link_by_order(&o, &[wrong_seq], &Tolerances::default()),
        Err(LinkError::SequenceMismatch { .. })
    ));
    let dup = seq("S", vec![theirs(&o[0], "m0", "S"), theirs(&o[1], "m0", "S")]);
    assert_eq!(
        link_by_order(&o, &[dup], &Tolerances::default()),
        Err(LinkError::DuplicateImage("m0".into()))
    );
    let mut bad = o.clone();
    bad[1].lat = f64::NAN;
    assert!(matches!(
        link_by_order(&bad, &[], &Tolerances::default()),
        Err(LinkError::BadOurPosition { .. })
    ));
    let neg = Tolerances {
        distance_m: -1.0,
        ..Tolerances::default()
    };
    assert_eq!(link_by_order(&o, &[], &neg), Err(LinkError::BadTolerances));
    // Nothing on Mapillary's side: everything dropped, no error.
    let r = link_by_order(&o, &[], &Tolerances::default()).expect("report");
    assert_eq!(r.dropped_count(), 2);
    assert!(r.sequence_ids.is_empty());
}

/// Deterministic shuffle (xorshift), so the test needs no RNG crate.
fn shuffle<T>(v: &mut [T], mut seed: u64) {
    for i in (1..v.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.swap(i, (seed % (i as u64 + 1)) as usize);
    }
}

#[test]
fn plan_a_should_link_the_same_images_as_plan_b() {
    let o = ours(40);
    // Mapillary: two sequences (split at 25), dropped #7 and #30, rounded times, ~1 m offsets
    // (as tile coordinates would give).
    let mut sequences = vec![seq("SEQ_A", vec![]), seq("SEQ_B", vec![])];
    for (k, img) in o.iter().enumerate() {
        if k == 7 || k == 30 {
            continue;
        }
        let s = if k < 25 { 0 } else { 1 };
        let sid = sequences[s].id.clone();
        let mut m = theirs(img, &format!("{}", 5_000 + k), &sid);
        m.captured_at_ms = (m.captured_at_ms / 1000) * 1000;
        m.lon += 0.7 / 84_000.0;
        sequences[s].images.push(m);
    }
    // Plus an image in SEQ_B that is not ours (Mapillary's own addition, e.g. a late image).
    let mut extra = theirs(&o[39], "7777", "SEQ_B");
    extra.captured_at_ms += 60_000;
    extra.lat += 0.01;
    sequences[1].images.push(extra);

    let plan_b = link_by_order(&o, &sequences, &Tolerances::default()).expect("plan B");

    // Plan A sees the same images as candidates, in tile order, with duplicates (an image in
    // two tiles) and noise: another user's sequence on the same street a day later, and one at
    // the same time 300 m away.
    let mut candidates: Vec<MapillaryImage> = sequences.iter().flat_map(|s| s.images.clone()).collect();
    candidates.extend(sequences[0].images[..5].iter().cloned());
    for (k, img) in o.iter().enumerate() {
        let mut later = theirs(img, &format!("{}", 8_000 + k), "NOISE_LATER");
        later.captured_at_ms += 86_400_000;
        candidates.push(later);
        let mut aside = theirs(img, &format!("{}", 9_000 + k), "NOISE_ASIDE");
        aside.lon += 300.0 / 84_000.0;
        candidates.push(aside);
    }
    shuffle(&mut candidates, 0x9E37_79B9_7F4A_7C15);
    let plan_a = match_candidates(&o, &candidates, &Tolerances::default()).expect("plan A");

    assert_eq!(plan_a.path, LinkPath::CoverageTiles);
    assert_eq!(plan_b.linked_count(), 38);
    assert_eq!(plan_a.images, plan_b.images);
    assert_eq!(plan_a.sequence_ids, plan_b.sequence_ids);
    assert_eq!(plan_a.sequence_ids, ["SEQ_A", "SEQ_B"]);
    assert_eq!(plan_a.unmatched_mapillary, plan_b.unmatched_mapillary);
    assert_eq!(plan_a.unmatched_mapillary, ["7777"]);
}

#[test]
fn when_no_candidate_matches_plan_a_should_link_nothing() {
    let o = ours(3);
    let mut far: Vec<MapillaryImage> = o
        .iter()
        .enumerate()
        .map(|(k, img)| theirs(img, &format!("{k}"), "FAR"))
        .collect();
    for m in &mut far {
        m.lat += 1.0;
    }
    let r = match_candidates(&o, &far, &Tolerances::default()).expect("report");
    assert_eq!(r.linked_count(), 0);
    assert!(r.sequence_ids.is_empty());
    assert!(r.unmatched_mapillary.is_empty());
}

#[test]
fn extreme_capture_times_and_tolerances_do_not_overflow() {
    let mut ours = ours(2);
    ours[0].captured_at_ms = i64::MIN + 5;
    ours[1].captured_at_ms = i64::MAX - 5;
    let candidates = vec![
        theirs(&ours[0], "1", "S1"),
        theirs(&ours[1], "2", "S1"),
        MapillaryImage {
            captured_at_ms: 0,
            ..theirs(&ours[0], "3", "S2")
        },
    ];
    // A tolerance so wide that `t ± tol` leaves i64 for both images.
    let tol = Tolerances {
        captured_at_ms: i64::MAX,
        ..Tolerances::default()
    };
    let report = match_candidates(&ours, &candidates, &tol).expect("links");
    let links: Vec<(&str, &str)> = report.links().collect();
    assert_eq!(links, vec![("img_000.jpg", "1"), ("img_001.jpg", "2")]);
}
