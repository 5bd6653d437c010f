fn main() {
    // The agent reports the target triple it was built for, and matches bundles against it.
    println!(
        "cargo:rustc-env=AGENT_TARGET={}",
        std::env::var("TARGET").unwrap()
    );
}
