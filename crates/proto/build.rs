//! Compiles proto/nicwarden.proto with protox (a pure-Rust protobuf compiler), so building
//! needs no `protoc` on the machine.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/nicwarden.proto");
    let fds = protox::compile(["proto/nicwarden.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
