//! The `bundler` command: a thin wrapper over the `bundler` library.
//!
//! Exit codes: 0 success; 1 failure (for `verify`: the bundle is invalid); 2 usage errors
//! (bad flags, or a keyring file that cannot be read).

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use bundler::cli::{Cli, Command};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Keygen(args) => {
            let files = bundler::keygen_files(&args.out_dir, &args.name)?;
            if args.json {
                print_json(&files)?;
            } else {
                println!("{}", files.key_id);
                eprintln!(
                    "wrote {} (secret, mode 0600) and {}",
                    files.secret.display(),
                    files.public.display()
                );
            }
        }
        Command::Build(args) => {
            let progress = std::io::stdout().is_terminal() && !args.json;
            let report = bundler::build(&args.to_options(progress))
                .with_context(|| format!("build of {} failed", args.model.display()))?;
            if args.json {
                print_json(&report)?;
            } else {
                println!(
                    "wrote {} ({} bytes, sha256 {})",
                    report.output.display(),
                    report.size,
                    report.sha256
                );
                println!(
                    "  {} {} security version {}, signed by {}",
                    report.name, report.version, report.security_version, report.key_id
                );
                println!(
                    "  golden: {} of {} samples evaluated ({})",
                    report.golden_count, report.evaluated, report.golden_source
                );
                if let Some(a) = report.accuracy {
                    println!("  accuracy {a:.4}");
                }
                if let Some(r) = report.quantization.record() {
                    println!(
                        "  quantization {}: {} tensors; {}",
                        report.quantization.mode(),
                        r.tensors,
                        bundler::quality::summary(&r.quality)
                    );
                }
                match &report.half_compute {
                    Some(bundler::half::HalfCompute::Offered { here, .. }) => println!(
                        "  f16 compute: offered to devices with native float16 (here in float16: {here})"
                    ),
                    Some(bundler::half::HalfCompute::NotOffered { reason }) => {
                        println!("  f16 compute: not offered, devices compute in float32: {reason}")
                    }
                    None => {}
                }
                println!(
                    "  latency batch 1: p50 {:.0} us, p95 {:.0} us",
                    report.latency.p50_us, report.latency.p95_us
                );
            }
        }
        Command::Verify(args) => {
            let keyring = match bundler::load_keyring(&args.keyrings) {
                Ok(k) => k,
                Err(e) => {
                    eprintln!("error: {:#}", anyhow::Error::from(e));
                    return Ok(ExitCode::from(2));
                }
            };
            return Ok(match bundler::verify(&args.bundle, &keyring) {
                Ok(v) => {
                    if args.json {
                        print_json(&bundler::VerifyReport::valid(&args.bundle, &v))?;
                    } else {
                        let ids: Vec<String> = v.signed_by.iter().map(|k| k.to_string()).collect();
                        println!(
                            "{}: valid — {} {} (security version {}), signed by {}, sha256 {}",
                            args.bundle.display(),
                            v.manifest.name,
                            v.manifest.version,
                            v.manifest.security_version,
                            ids.join(", "),
                            v.sha256
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    if args.json {
                        print_json(&bundler::VerifyReport::invalid(&args.bundle, &e))?;
                    }
                    eprintln!("error: {:#}", anyhow::Error::from(e));
                    ExitCode::from(1)
                }
            });
        }
        Command::KeyringUpdate(args) => {
            let update = match (&args.cosign, args.version) {
                (Some(path), _) => bundler::keyring_update::cosign(path, &args.signers)?,
                (None, Some(version)) => bundler::keyring_update::new_update(
                    version,
                    args.threshold,
                    &args.keys,
                    &args.signers,
                )?,
                (None, None) => unreachable!("clap requires --version without --cosign"),
            };
            let json = serde_json::to_vec_pretty(&update)?;
            std::fs::write(&args.output, json)
                .with_context(|| format!("cannot write {}", args.output.display()))?;
            let signers: Vec<String> = update
                .signatures
                .iter()
                .map(|s| s.key_id.to_string())
                .collect();
            println!("{} signed by {}", args.output.display(), signers.join(", "));
        }
        Command::Inspect(args) => {
            let report = bundler::inspect(&args.bundle)?;
            if args.json {
                print_json(&report)?;
            } else {
                print!("{}", report.to_text());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
