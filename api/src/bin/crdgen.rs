//! Writes the CustomResourceDefinitions to `config/crd/` (or the directory
//! given as the only argument), replacing stale files.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("config")
                .join("crd")
        });
    let files = match trellis_api::crds::render() {
        Ok(files) => files,
        Err(e) => {
            eprintln!("crdgen: cannot render the CRDs as YAML: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("crdgen: cannot create {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    // Remove generated files that no longer correspond to a kind.
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale = name.ends_with(".yaml") && !files.iter().any(|(f, _)| *f == name);
            if stale && let Err(e) = std::fs::remove_file(entry.path()) {
                eprintln!("crdgen: cannot remove stale {name}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    for (name, contents) in files {
        let path = dir.join(&name);
        if let Err(e) = std::fs::write(&path, contents) {
            eprintln!("crdgen: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
