//! Generates the agent API's messages and ttrpc client/server into OUT_DIR.
//! The generated files start with inner attributes (`#![allow(..)]`), which
//! `include!` inside a module cannot take, so they are stripped here and the
//! allowances put on the modules in lib.rs instead.

use std::path::Path;

fn main() {
    let out_dir = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    println!("cargo:rerun-if-changed=proto/agent.proto");
    ttrpc_codegen::Codegen::new()
        .out_dir(&out_dir)
        .inputs(["proto/agent.proto"])
        .include("proto")
        .rust_protobuf()
        .run()
        .expect("generating the agent API from proto/agent.proto");
    for name in ["agent.rs", "agent_ttrpc.rs"] {
        let path = Path::new(&out_dir).join(name);
        let text = std::fs::read_to_string(&path).expect("reading generated code");
        let kept: Vec<&str> = text
            .lines()
            .filter(|line| !line.starts_with("#![") && !line.starts_with("//!"))
            .collect();
        std::fs::write(&path, kept.join("\n")).expect("writing generated code");
    }
}
