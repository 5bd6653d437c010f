//! Bundle build and verify throughput on `mobilenetish` (14 MB of float weights).
//!
//! ```sh
//! cargo run --release -p modelfleet-bundler --example bundle_bench [-- ITERATIONS]
//! ```
//!
//! Build time is split into load + evaluate (engine load, golden evaluation, reference latency),
//! compress (zstd of the model and the golden set) and sign + write (manifest, signature, temp
//! file, fsync, read-back verification, rename). Verify throughput is MB/s of decompressed
//! payload through the full verifying reader, measured side by side with the floor it cannot
//! beat: sha256 + streamed zstd decode of the same payloads, and each of those alone.
//! Prints a Markdown table (the BENCHMARKS.md section).

use std::io::{self, Read};
use std::path::Path;
use std::time::Instant;

use protocol::bundle::{compress_payload, read_bundle, DiscardSink, VerifyOptions};
use sha2::{Digest, Sha256};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let iterations: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(10);
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models/mobilenetish");
    let onnx = models.join("mobilenetish.onnx");
    let dir = tempfile::tempdir()?;
    bundler::keygen(dir.path(), "bench")?;
    let mut opts = bundler::BuildOptions::new(
        &onnx,
        "mobilenetish",
        "1.0.0",
        1,
        dir.path().join("bench.key"),
        dir.path().join("bench.mfb"),
    );
    opts.golden_inputs = Some(models.join("test_input.npy"));
    opts.latency_runs = 10;

    // Build three times; report the median of each step.
    let mut reports = Vec::new();
    for _ in 0..3 {
        reports.push(bundler::build(&opts)?);
    }
    let step = |f: &dyn Fn(&bundler::BuildTimings) -> f64| {
        median(reports.iter().map(|r| f(&r.timings)).collect())
    };
    let load = step(&|t| t.load_ms);
    let eval = step(&|t| t.evaluate_ms);
    let latency = step(&|t| t.latency_ms);
    let compress = step(&|t| t.compress_ms);
    let sign_write = step(&|t| t.sign_write_ms);
    let total = step(&|t| t.total_ms);
    let report = &reports[0];
    let payload_bytes: u64 = report.payloads.iter().map(|p| p.size).sum();
    let compressed_bytes: u64 = report.payloads.iter().map(|p| p.compressed_size).sum();

    // Verify from memory (the file's bytes), full reader.
    let bundle = std::fs::read(&opts.output)?;
    let keyring = bundler::load_keyring(&[dir.path().join("bench.pub")])?;
    let vopts = VerifyOptions::new(&keyring);
    let mb = payload_bytes as f64 / 1e6;
    let time = |f: &mut dyn FnMut()| {
        f(); // warm-up
        let t = Instant::now();
        for _ in 0..iterations {
            f();
        }
        t.elapsed().as_secs_f64() / iterations as f64
    };
    let verify_mem = time(&mut || {
        read_bundle(&bundle[..], &vopts, &mut DiscardSink).expect("valid");
    });
    let verify_file = time(&mut || {
        bundler::verify(&opts.output, &keyring).expect("valid");
    });

    // The floor: the same compressed payloads, sha256 of the decompressed bytes + zstd decode.
    let model_bytes = std::fs::read(&onnx)?;
    let payloads: Vec<(Vec<u8>, Vec<u8>)> = [&model_bytes[..]]
        .iter()
        .map(|data| {
            let p = compress_payload("model.onnx", data, opts.zstd_level, |_, _| {}).unwrap();
            (p.bytes, data.to_vec())
        })
        .collect();
    let floor_mb = payloads.iter().map(|(_, d)| d.len()).sum::<usize>() as f64 / 1e6;
    let decode_and_hash = time(&mut || {
        for (c, _) in &payloads {
            let mut dec = zstd::stream::read::Decoder::new(&c[..]).unwrap();
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = dec.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            std::hint::black_box(h.finalize());
        }
    });
    let decode_only = time(&mut || {
        for (c, _) in &payloads {
            let mut dec = zstd::stream::read::Decoder::new(&c[..]).unwrap();
            io::copy(&mut dec, &mut io::sink()).unwrap();
        }
    });
    let hash_only = time(&mut || {
        for (_, d) in &payloads {
            std::hint::black_box(Sha256::digest(d));
        }
    });

    let machine = bundler::machine_name();
    println!("## Bundle build and verify\n");
    println!(
        "`mobilenetish` ({} bytes ONNX, 4 golden inputs), zstd level {}, on {machine}.",
        model_bytes.len(),
        opts.zstd_level
    );
    println!(
        "Command: `cargo run --release -p modelfleet-bundler --example bundle_bench -- {iterations}` \
         (build: median of 3; verify: mean of {iterations} after a warm-up).\n"
    );
    println!(
        "Bundle: {} bytes; payloads {payload_bytes} bytes decompressed, {compressed_bytes} compressed ({:.1}%).\n",
        report.size,
        100.0 * compressed_bytes as f64 / payload_bytes as f64
    );
    println!("| build step | time |");
    println!("|---|---|");
    println!("| load model (engine: parse, declutter, optimise 2 plans) | {load:.0} ms |");
    println!("| evaluate golden inputs (4 samples) | {eval:.0} ms |");
    println!("| reference latency (2 warm-up + 10 runs at batch 1) | {latency:.0} ms |");
    println!("| compress payloads | {compress:.0} ms |");
    println!("| sign + write (temp file, fsync, read-back verify, rename) | {sign_write:.0} ms |");
    println!("| **total** | **{total:.0} ms** |\n");
    println!("| verify path | time | MB/s of decompressed payload |");
    println!("|---|---|---|");
    let row = |name: &str, secs: f64, mb: f64| {
        println!("| {name} | {:.1} ms | {:.0} |", secs * 1e3, mb / secs)
    };
    row("`bundler::verify` (file, full reader)", verify_file, mb);
    row("`read_bundle` from memory (full reader)", verify_mem, mb);
    row(
        "floor: zstd decode + sha256 of model payload",
        decode_and_hash,
        floor_mb,
    );
    row("zstd decode only", decode_only, floor_mb);
    row("sha256 only (decompressed bytes)", hash_only, floor_mb);
    println!(
        "\nVerify runs at {:.0}% of the decode + hash floor (target: ≥ 300 MB/s).",
        100.0 * (mb / verify_mem) / (floor_mb / decode_and_hash)
    );
    Ok(())
}
