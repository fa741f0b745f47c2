//! Generates the x86_64 syscall name table for seccomp profiles from the
//! kernel headers (Debian's linux-libc-dev), which name every syscall.

use std::fmt::Write;
use std::path::PathBuf;

const HEADER: &str = "/usr/include/x86_64-linux-gnu/asm/unistd_64.h";

fn main() {
    println!("cargo:rerun-if-changed={HEADER}");
    let text = std::fs::read_to_string(HEADER)
        .unwrap_or_else(|e| panic!("reading {HEADER} (install linux-libc-dev): {e}"));
    let mut table = String::from("/// x86_64 syscall numbers by name, sorted by name.\npub static SYSCALLS: &[(&str, u32)] = &[\n");
    let mut entries: Vec<(String, u32)> = text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("#define __NR_")?;
            let (name, number) = rest.split_once(char::is_whitespace)?;
            Some((name.to_string(), number.trim().parse().ok()?))
        })
        .collect();
    entries.sort();
    for (name, number) in entries {
        writeln!(table, "    ({name:?}, {number}),").expect("writing to a String");
    }
    table.push_str("];\n");
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("syscalls.rs");
    std::fs::write(&out, table).unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
}
