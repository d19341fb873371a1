//! include/dlsession.h is generated from the source by cbindgen and checked in, so that
//! C users (and review) see the API without building it. This test fails when the two
//! drift apart; `DLSESSION_BLESS=1 cargo test -p dlsession-ffi --test header` rewrites it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

#[test]
fn header_matches_the_source() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("read cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(dir.join("src/lib.rs"))
        .generate()
        .expect("cbindgen parses the source");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let generated = String::from_utf8(generated).expect("the header is UTF-8");
    let path = dir.join("include/dlsession.h");
    if std::env::var_os("DLSESSION_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &generated).expect("write include/dlsession.h");
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    if checked_in != generated {
        let first = checked_in.lines().zip(generated.lines()).position(|(a, b)| a != b);
        let line = first.unwrap_or_else(|| checked_in.lines().count().min(generated.lines().count()));
        let show = |text: &str| text.lines().nth(line).unwrap_or("<end of file>").to_owned();
        panic!(
            "ffi/include/dlsession.h is out of date with ffi/src (first difference at line {}):\n  \
             checked in: {}\n  generated:  {}\nRegenerate it with:\n  \
             DLSESSION_BLESS=1 cargo test -p dlsession-ffi --test header",
            line + 1,
            show(&checked_in),
            show(&generated),
        );
    }
}
