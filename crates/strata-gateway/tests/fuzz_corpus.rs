//! Replays the fuzz targets' seeds and every input a fuzzer ever crashed
//! (`fuzz/seeds/<target>/`, `fuzz/regressions/<target>/`) through the same
//! entry points `cargo fuzz` runs, on the stable toolchain, with every test
//! run: a crash once found stays fixed.

use std::path::{Path, PathBuf};

use strata_gateway::fuzzing::Target;

fn inputs(kind: &str, target: Target) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz")
        .join(kind)
        .join(target.name());
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

fn replay(kind: &str) -> usize {
    let mut count = 0;
    for target in Target::ALL {
        for file in inputs(kind, target) {
            let data = std::fs::read(&file).unwrap();
            let outcome = std::panic::catch_unwind(|| target.run(&data));
            assert!(
                outcome.is_ok(),
                "{} broke on {}",
                target.name(),
                file.display()
            );
            count += 1;
        }
    }
    count
}

#[test]
fn seeds_and_inputs_that_once_crashed_pass() {
    for target in Target::ALL {
        assert!(
            !inputs("seeds", target).is_empty(),
            "fuzz/seeds/{} is empty",
            target.name()
        );
    }
    assert!(replay("seeds") >= Target::ALL.len());
    replay("regressions");
}
