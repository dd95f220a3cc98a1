//! Compiles the eBPF policy programs (`bpf/*.bpf.c`) with clang into
//! `OUT_DIR`, where `src/bpf/datapath.rs` embeds them.
//!
//! Needs clang (Debian: `clang`) and libbpf's headers (`libbpf-dev`);
//! `scripts/install-deps.sh` installs both. Set `CLANG` to use another
//! clang binary.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let bpf = manifest.join("bpf");
    println!("cargo:rerun-if-env-changed=CLANG");
    // Every file under bpf/: the programs and the headers they include.
    println!("cargo:rerun-if-changed={}", bpf.display());
    let mut files = Vec::new();
    walk(&bpf, &mut files);
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }

    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    if Command::new(&clang).arg("--version").output().is_err() {
        panic!(
            "`{clang}` not found: the eBPF policy programs are built with clang. \
             Install the Debian package `clang` (scripts/install-deps.sh does), \
             or set CLANG to a clang binary."
        );
    }
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        panic!(
            "/usr/include/bpf/bpf_helpers.h not found: the eBPF policy programs need libbpf's \
             headers. Install the Debian package `libbpf-dev` (scripts/install-deps.sh does)."
        );
    }
    // The kernel headers include <asm/...>, which Debian keeps under the
    // multiarch directory (gcc-multilib would add an /usr/include/asm link).
    let multiarch = match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("aarch64") => "aarch64-linux-gnu",
        _ => "x86_64-linux-gnu",
    };

    let programs = files
        .iter()
        .filter(|f| f.parent() == Some(bpf.as_path()))
        .filter(|f| f.to_string_lossy().ends_with(".bpf.c"));
    for source in programs {
        let stem = source
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".c"))
            .expect("a .bpf.c file name");
        // `<stem>.o` pins its maps by name; `<stem>.unpinned.o` is the same
        // code without the pinning attribute (see bpf/lib/maps.h);
        // `<stem>.helper-reads.o`, unpinned too, reads every header with
        // bpf_skb_load_bytes (see bpf/lib/parse.h): the tests run on both.
        for (object, defines) in [
            (format!("{stem}.o"), &[][..]),
            (format!("{stem}.unpinned.o"), &["-DTRELLIS_UNPINNED"][..]),
            (
                format!("{stem}.helper-reads.o"),
                &["-DTRELLIS_UNPINNED", "-DTRELLIS_HELPER_READS"][..],
            ),
        ] {
            let output = Command::new(&clang)
                .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
                .args(defines)
                .arg(format!("-I/usr/include/{multiarch}"))
                .arg("-I")
                .arg(bpf.join("include"))
                .arg("-I")
                .arg(bpf.join("lib"))
                .arg("-c")
                .arg(source)
                .arg("-o")
                .arg(out.join(object))
                .output()
                .unwrap_or_else(|e| panic!("cannot run {clang}: {e}"));
            if !output.status.success() {
                panic!(
                    "clang failed on {}:\n{}{}",
                    source.display(),
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut paths: Vec<PathBuf> = entries
        .map(|e| e.expect("a directory entry").path())
        .collect();
    paths.sort();
    for path in paths {
        if path.is_dir() {
            walk(&path, out);
        } else {
            out.push(path);
        }
    }
}
