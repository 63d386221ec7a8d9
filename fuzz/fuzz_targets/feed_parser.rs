//! `getLatestActivity` replies: any bytes → `Ok` or a `FeedError`, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_fuzz::feed::parse_page;

fuzz_target!(|data: &[u8]| {
    let body = String::from_utf8_lossy(data);
    if let Ok(page) = parse_page(&body) {
        // What the poller reads next must hold together too.
        assert!(!page.has_next_page || page.end_cursor.is_some());
        for n in &page.nodes {
            assert!(!n.cluster_id.is_empty());
            let _ = n.stages.all_finished();
            let _ = n.stages.any_failed();
        }
    }
});
