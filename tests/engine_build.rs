//! Engine builds are hermetic: the flags that key every variant turn off the web UI download,
//! and the CPU build's configure log (which `scripts/build-engine` keeps next to the cache)
//! shows no download attempt. Reads files only; builds nothing.

use crate::util;

#[test]
fn every_variant_is_configured_without_the_web_ui_download() {
    let flags = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/engine-flags"),
    )
    .unwrap();
    let common = flags
        .lines()
        .find(|l| l.starts_with("common "))
        .expect("scripts/engine-flags has a common line");
    for flag in ["-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF"] {
        assert!(
            common.split(' ').any(|f| f == flag),
            "{flag} missing from: {common}"
        );
    }
}

#[test]
fn the_cpu_build_configured_without_reaching_for_the_network() {
    let prefix = util::engine_prefix();
    let name = prefix.file_name().unwrap().to_str().unwrap();
    let build = name.strip_prefix("llama.cpp-").expect("prefix name");
    let log = prefix
        .parent()
        .unwrap()
        .join(format!("build-{build}.configure.log"));
    let text = std::fs::read_to_string(&log).unwrap_or_else(|e| {
        panic!(
            "read {} (scripts/build-engine writes it on every configure): {e}",
            log.display()
        )
    });
    assert!(
        text.contains("Build files have been written"),
        "{}",
        log.display()
    );
    let lower = text.to_ascii_lowercase();
    for word in ["download", "http://", "https://"] {
        assert!(
            !lower.contains(word),
            "{} mentions {word:?}: configure reached for the network",
            log.display()
        );
    }
}
