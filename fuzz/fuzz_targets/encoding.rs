//! Content-Encoding: hostile compressed data never panics and never exceeds the bound.
#![no_main]

use kya_agent::mcp::encoding::{decode, Coding};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let all = [Coding::Gzip, Coding::Deflate, Coding::Brotli];
    let first = all[usize::from(sel % 3)];
    let codings: Vec<Coding> = if sel & 0x80 != 0 {
        vec![all[usize::from((sel >> 2) % 3)], first]
    } else {
        vec![first]
    };
    if let Ok(out) = decode(&codings, body, MAX) {
        assert!(out.len() <= MAX);
    }
});
