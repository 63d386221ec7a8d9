//! Coverage-tile maths and decoding (shared::domain::tiles), against tiles built with the `mvt`
//! encoder (the one the simulator uses).

use mvt::{GeomEncoder, GeomType, Tile};
use shared::domain::tiles::{
    decode_coverage_tile, distance_m, tiles_covering_points, BBox, DecodeError, LonLat, TileId, COVERAGE_ZOOM,
};

const EXTENT: u32 = 4096;

/// A case name and the tags it puts on a feature.
type AddTags = (&'static str, fn(&mut mvt::Feature));

/// Tile-local coordinates of a lon/lat inside `t` (the inverse of `TileId::lon_lat_at`).
fn local(t: TileId, p: LonLat) -> (f64, f64) {
    let n = f64::from(1u32 << t.z);
    let lat = p.lat.to_radians();
    let wx = (p.lon + 180.0) / 360.0 * n;
    let wy = (1.0 - (lat.tan() + 1.0 / lat.cos()).ln() / std::f64::consts::PI) / 2.0 * n;
    (
        (wx - f64::from(t.x)) * f64::from(EXTENT),
        (wy - f64::from(t.y)) * f64::from(EXTENT),
    )
}

fn tile_for(p: LonLat) -> TileId {
    TileId::containing(p, COVERAGE_ZOOM).expect("tile")
}

#[test]
fn when_tile_has_documented_layers_should_decode_typed_features() {
    let a = LonLat::new(2.173_50, 41.385_10);
    let b = LonLat::new(2.173_60, 41.385_20);
    let t = tile_for(a);
    let mut tile = Tile::new(EXTENT);

    // `image` layer: ids as documented (int id, string sequence_id) plus an extra `creator_id`.
    let mut layer = tile.create_layer("image");
    for (i, p) in [a, b].into_iter().enumerate() {
        let (x, y) = local(t, p);
        let geom = GeomEncoder::new(GeomType::Point)
            .point(x, y)
            .expect("point")
            .encode()
            .expect("encode");
        let mut f = layer.into_feature(geom);
        f.add_tag_uint("id", 1_000_000_000_000_001 + i as u64);
        f.add_tag_string("sequence_id", "seqAAA");
        f.add_tag_int("captured_at", 1_683_629_036_000 + i as i64 * 1000);
        f.add_tag_double("compass_angle", 90.5);
        f.add_tag_bool("is_pano", false);
        f.add_tag_uint("creator_id", 42);
        f.add_tag_string("unknown_extra", "ignored");
        layer = f.into_layer();
    }
    tile.add_layer(layer).expect("layer");

    // `sequence` layer: string id, int image_id.
    let (ax, ay) = local(t, a);
    let (bx, by) = local(t, b);
    let geom = GeomEncoder::new(GeomType::Linestring)
        .point(ax, ay)
        .expect("p")
        .point(bx, by)
        .expect("p")
        .encode()
        .expect("encode");
    let mut f = tile.create_layer("sequence").into_feature(geom);
    f.add_tag_string("id", "seqAAA");
    f.add_tag_int("image_id", 1_000_000_000_000_001);
    f.add_tag_int("captured_at", 1_683_629_036_000);
    f.add_tag_bool("is_pano", false);
    tile.add_layer(f.into_layer()).expect("layer");

    let bytes = tile.to_bytes().expect("bytes");
    let decoded = decode_coverage_tile(t, &bytes).expect("decodes");
    assert!(decoded.rejected.is_empty(), "{:?}", decoded.rejected);
    assert_eq!(decoded.images.len(), 2);
    let img = &decoded.images[0];
    assert_eq!(img.id, "1000000000000001");
    assert_eq!(img.sequence_id, "seqAAA");
    assert_eq!(img.captured_at_ms, Some(1_683_629_036_000));
    assert_eq!(img.compass_angle, Some(90.5));
    assert_eq!(img.is_pano, Some(false));
    assert_eq!(img.creator_id.as_deref(), Some("42"));
    // Extent 4096 at z14: positions within a metre.
    assert!(distance_m(img.position, a) < 1.0, "{:?}", img.position);
    assert!(distance_m(decoded.images[1].position, b) < 1.0);

    assert_eq!(decoded.sequences.len(), 1);
    let s = &decoded.sequences[0];
    assert_eq!(s.id, "seqAAA");
    assert_eq!(s.image_id.as_deref(), Some("1000000000000001"));
    assert_eq!(s.parts.len(), 1);
    assert!(distance_m(s.parts[0][1], b) < 1.0);
}

#[test]
fn when_ids_are_strings_or_doubles_should_accept_them() {
    let p = LonLat::new(-83.490_103_6, 31.358_221_3);
    let t = tile_for(p);
    let (x, y) = local(t, p);
    let mut tile = Tile::new(EXTENT);
    let mut layer = tile.create_layer("image");
    for id in 0..3 {
        let geom = GeomEncoder::new(GeomType::Point)
            .point(x, y)
            .expect("point")
            .encode()
            .expect("encode");
        let mut f = layer.into_feature(geom);
        match id {
            0 => f.add_tag_string("id", "555"),
            1 => f.add_tag_double("id", 556.0),
            _ => f.add_tag_sint("id", 557),
        }
        f.add_tag_int("sequence_id", 9);
        f.add_tag_string("captured_at", "1683629036000");
        f.add_tag_float("compass_angle", 10.0);
        layer = f.into_layer();
    }
    tile.add_layer(layer).expect("layer");
    let decoded = decode_coverage_tile(t, &tile.to_bytes().expect("bytes")).expect("decodes");
    let ids: Vec<&str> = decoded.images.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["555", "556", "557"]);
    assert!(decoded.images.iter().all(|i| i.sequence_id == "9"));
    assert!(decoded
        .images
        .iter()
        .all(|i| i.captured_at_ms == Some(1_683_629_036_000)));
}

#[test]
fn when_a_feature_is_unreadable_should_reject_it_with_a_reason() {
    let p = LonLat::new(13.4, 52.5);
    let t = tile_for(p);
    let (x, y) = local(t, p);
    let mut tile = Tile::new(EXTENT);
    let mut layer = tile.create_layer("image");
    let cases: [AddTags; 4] = [
        ("ok", |f| {
            f.add_tag_int("id", 1);
            f.add_tag_string("sequence_id", "s");
        }),
        ("no id", |f| f.add_tag_string("sequence_id", "s")),
        ("float id", |f| {
            f.add_tag_double("id", 1.5);
            f.add_tag_string("sequence_id", "s");
        }),
        ("bad time", |f| {
            f.add_tag_int("id", 2);
            f.add_tag_string("sequence_id", "s");
            f.add_tag_string("captured_at", "yesterday");
        }),
    ];
    for (_, add) in cases {
        let geom = GeomEncoder::new(GeomType::Point)
            .point(x, y)
            .expect("point")
            .encode()
            .expect("encode");
        let mut f = layer.into_feature(geom);
        add(&mut f);
        layer = f.into_layer();
    }
    // A line where a point is expected.
    let geom = GeomEncoder::new(GeomType::Linestring)
        .point(1.0, 1.0)
        .expect("p")
        .point(2.0, 2.0)
        .expect("p")
        .encode()
        .expect("encode");
    let mut f = layer.into_feature(geom);
    f.add_tag_int("id", 3);
    f.add_tag_string("sequence_id", "s");
    tile.add_layer(f.into_layer()).expect("layer");
    tile.add_layer(tile.create_layer("mly_map_feature_point"))
        .expect("layer");

    let decoded = decode_coverage_tile(t, &tile.to_bytes().expect("bytes")).expect("decodes");
    assert_eq!(decoded.images.len(), 1);
    let reasons: Vec<(usize, &str)> = decoded
        .rejected
        .iter()
        .map(|r| (r.index, r.reason.as_str()))
        .collect();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    assert!(reasons[0].1.contains("`id` is missing"), "{reasons:?}");
    assert!(reasons[1].1.contains("`id`"), "{reasons:?}");
    assert!(reasons[2].1.contains("`captured_at`"), "{reasons:?}");
    assert!(reasons[3].1.contains("not a point"), "{reasons:?}");
    assert!(decoded.rejected.iter().all(|r| r.layer == "image"));
    assert_eq!(decoded.other_layers, ["mly_map_feature_point"]);
}

#[test]
fn when_geometry_has_absurdly_many_parts_should_refuse_before_decoding() {
    let t = TileId::new(14, 100, 100).expect("tile");
    let mut enc = GeomEncoder::new(GeomType::Linestring);
    for k in 0..2_000 {
        let x = f64::from(k % 4000);
        enc.add_point(x, 1.0).expect("p");
        enc.add_point(x, 2.0).expect("p");
        enc.complete_geom().expect("part");
    }
    let mut f = Tile::new(EXTENT)
        .create_layer("sequence")
        .into_feature(enc.encode().expect("encode"));
    f.add_tag_string("id", "s");
    let mut tile = Tile::new(EXTENT);
    tile.add_layer(f.into_layer()).expect("layer");
    let err = decode_coverage_tile(t, &tile.to_bytes().expect("bytes")).expect_err("refused");
    assert!(matches!(err, DecodeError::TooComplex { .. }), "{err}");
}

#[test]
fn when_bytes_are_not_a_tile_should_error_clearly() {
    let t = TileId::new(14, 1, 1).expect("tile");
    for junk in [
        &b"<html>403 Forbidden</html>"[..],
        &[0x1a, 0xff, 0xff, 0xff, 0xff, 0x0f][..],
        &[0x1a, 0x02, 0x78][..],
    ] {
        let err = decode_coverage_tile(t, junk).expect_err("not a tile");
        assert!(matches!(err, DecodeError::Malformed(_)), "{err} for {junk:?}");
        assert!(err.to_string().starts_with("coverage tile"));
    }
}

#[test]
fn when_points_straddle_a_tile_edge_should_cover_both_tiles() {
    // A point 2 m west of a z14 column boundary: with a 5 m margin both columns are needed.
    let t = TileId::new(14, 8800, 5373).expect("tile");
    let edge = t.bounds();
    let lat = (edge.north + edge.south) / 2.0;
    let near_edge = LonLat::new(edge.east - 2.0 / 111_195.0 / lat.to_radians().cos(), lat);
    let middle = LonLat::new((edge.west + edge.east) / 2.0, lat);
    let only_middle = tiles_covering_points(&[middle], 14, 5.0, 16).expect("tiles");
    assert_eq!(only_middle, [t]);
    let both = tiles_covering_points(&[middle, near_edge], 14, 5.0, 16).expect("tiles");
    assert_eq!(both, [t, TileId::new(14, 8801, 5373).expect("tile")]);
    // No margin: the point's own tile only.
    assert_eq!(
        tiles_covering_points(&[near_edge], 14, 0.0, 16).expect("tiles"),
        [t]
    );
    assert!(tiles_covering_points(&[LonLat::new(0.0, 95.0)], 14, 5.0, 16).is_err());
    assert!(tiles_covering_points(&[middle], 14, -1.0, 16).is_err());
}

#[test]
fn bbox_of_points_and_margin() {
    let pts = [LonLat::new(1.0, 2.0), LonLat::new(3.0, -1.0)];
    let b = BBox::of_points(&pts).expect("valid").expect("some");
    assert_eq!((b.west, b.south, b.east, b.north), (1.0, -1.0, 3.0, 2.0));
    let g = b.expanded_m(1_000.0).expect("grown");
    assert!(g.west < 1.0 && g.east > 3.0 && g.south < -1.0 && g.north > 2.0);
    assert!(((g.north - 2.0) - (-1.0 - g.south)).abs() < 1e-9);
    assert_eq!(BBox::of_points(&[]).expect("valid"), None);
    assert_eq!(
        TileId::new(14, 8800, 5373).expect("tile").coverage_path(),
        "/maps/vtp/mly1_public/2/14/8800/5373"
    );
}
