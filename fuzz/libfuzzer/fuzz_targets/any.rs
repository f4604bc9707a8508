//! One libFuzzer binary for every target of `fissile-fuzz` (`fissile_fuzz::TARGETS`):
//! `FISSILE_FUZZ_TARGET` names the one to run, so adding a target there adds it here.
#![no_main]

use std::sync::OnceLock;

static TARGET: OnceLock<fissile_fuzz::Target> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let run = TARGET.get_or_init(|| {
        let name = std::env::var("FISSILE_FUZZ_TARGET").unwrap_or_default();
        fissile_fuzz::target(&name)
            .unwrap_or_else(|| panic!("FISSILE_FUZZ_TARGET={name:?} names no fissile-fuzz target"))
    });
    run(data);
});
