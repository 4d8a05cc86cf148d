//! Compiles `src/kya.bpf.c` (which includes one file per hook) into one BPF
//! object with clang, so that `kya` embeds it and has no runtime file to lose.
//!
//! The kernel side is C because aya's Rust BPF path needs nightly + bpf-linker,
//! which this project's build machines do not have.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCES: &[&str] = &[
    "kya.bpf.c",
    "kya.h",
    "common.h",
    "maps.h",
    "select.h",
    "connect.bpf.c",
    "sockops.bpf.c",
    "getpeername.bpf.c",
    "process.bpf.c",
];

fn main() {
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let src = manifest.join("src");
    for f in SOURCES {
        println!("cargo:rerun-if-changed=src/{f}");
    }
    println!("cargo:rerun-if-env-changed=CLANG");

    let clang = find_clang();
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    let (target_arch, multiarch) = match arch.as_str() {
        "x86_64" => ("x86", "x86_64-linux-gnu"),
        "aarch64" => ("arm64", "aarch64-linux-gnu"),
        "riscv64" => ("riscv", "riscv64-linux-gnu"),
        other => panic!("kya-ebpf: unsupported target architecture {other}"),
    };
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        panic!(
            "kya-ebpf: libbpf headers not found (/usr/include/bpf/bpf_helpers.h). \
             Install them with: apt-get install -y libbpf-dev"
        );
    }
    let obj = out.join("kya.bpf.o");
    let output = Command::new(&clang)
        .args([
            "-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror",
        ])
        .arg(format!("-D__TARGET_ARCH_{target_arch}"))
        .arg(format!("-I/usr/include/{multiarch}"))
        .arg("-I")
        .arg(&src)
        .arg("-c")
        .arg(src.join("kya.bpf.c"))
        .arg("-o")
        .arg(&obj)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "kya-ebpf: cannot run clang {clang:?}: {e}. \
                 Install it with: apt-get install -y clang-19 libbpf-dev (or point $CLANG at a clang)"
            )
        });
    if !output.status.success() {
        panic!(
            "kya-ebpf: {clang} failed to compile the BPF programs:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// `$CLANG` if set, else `clang-19`, else `clang`; a clear error otherwise.
fn find_clang() -> String {
    if let Ok(c) = env::var("CLANG") {
        if !c.is_empty() {
            return c;
        }
    }
    for candidate in ["clang-19", "clang"] {
        let ok = Command::new(candidate)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return candidate.to_string();
        }
    }
    panic!(
        "kya-ebpf: no clang found to compile the BPF programs (tried $CLANG, clang-19, clang). \
         Install it with: apt-get install -y clang-19 libbpf-dev"
    );
}
