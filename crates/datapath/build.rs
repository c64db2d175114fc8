//! Compiles the eBPF program `bpf/nicwarden.bpf.c` with clang into `$OUT_DIR/nicwarden.bpf.o`,
//! which `src/ebpf/ops.rs` embeds. Needs clang (with the BPF target) and the libbpf headers.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{exit, Command};

const SOURCE: &str = "bpf/nicwarden.bpf.c";
const INSTALL: &str = "install the Debian packages `clang` and `libbpf-dev` (apt-get install clang libbpf-dev; `make test` and `make demo` install them through scripts/deps.sh)";

fn fail(msg: &str) -> ! {
    eprintln!("error: building the eBPF program {SOURCE}: {msg}");
    exit(1)
}

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CLANG");

    let out_dir = match env::var_os("OUT_DIR") {
        Some(d) => PathBuf::from(d),
        None => fail("OUT_DIR is not set (not run by cargo?)"),
    };
    let object = out_dir.join("nicwarden.bpf.o");
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_string());

    let mut cmd = Command::new(&clang);
    cmd.args(["-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall"]);
    // <linux/types.h> includes <asm/types.h>, which Debian keeps in the multiarch directory;
    // with `-target bpf` clang does not look there by itself.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    for dir in [
        format!("/usr/include/{arch}-linux-gnu"),
        "/usr/include/x86_64-linux-gnu".to_string(),
    ] {
        if Path::new(&dir).is_dir() {
            cmd.arg(format!("-I{dir}"));
            break;
        }
    }
    cmd.arg("-c").arg(SOURCE).arg("-o").arg(&object);

    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fail(&format!("`{clang}` not found; {INSTALL}"))
        }
        Err(e) => fail(&format!("cannot run `{clang}`: {e}; {INSTALL}")),
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let hint = if stderr.contains("bpf/bpf_helpers.h") || stderr.contains("asm/types.h") {
            format!("headers missing; {INSTALL}")
        } else if stderr.contains("No available targets")
            || stderr.contains("unknown target")
            || stderr.contains("unable to create target")
        {
            format!("this clang has no BPF target; {INSTALL}")
        } else {
            format!("clang failed ({}); {INSTALL}", out.status)
        };
        fail(&format!("{hint}\n{stderr}"));
    }
}
