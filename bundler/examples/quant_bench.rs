//! The quantization table of BENCHMARKS.md: for each reference model, bundles built with
//! `--quantize none | int8-weights | int8 | f16` (size, quality, gate verdict; `int8` in both
//! `--int8-form`s, qdq and qoperator) and onnxruntime's
//! own quantized models (from `scripts/quant_ort.py --out-dir DIR`) run in *this* engine, then
//! batch-1 latency of every variant measured side by side in one process (round-robin).
//!
//! ```sh
//! python3 scripts/quant_ort.py --out-dir /tmp/ortq        # onnxruntime's models + its figures
//! cargo run -p modelfleet-bundler --example quant_bench -- --ort-dir /tmp/ortq [--seconds 1] [--models ...] [--save-dir DIR]
//! ```
//!
//! `--nnef` measures the NNEF bundles devices serve instead: `none`, `int8-weights` and `f16`
//! built with `--model-format nnef` (quantized weights stored narrow, `model.weights.bin`), each
//! installed the way the agent does it (narrow weights expanded, then loaded through the NNEF
//! path); the `model file` column is then the compressed size of the model payloads
//! (`model.nnef.tar.zst` + `model.weights.bin.zst`).
//!
//! `--save-dir DIR` also writes each of our model files as `DIR/MODEL.VARIANT.onnx` (e.g.
//! `digits_cnn.int8-qoperator.onnx`), for `engine_profile --model FILE`.
//!
//! Quality: accuracy on the test labels (digits), ROC AUC of the reconstruction error against
//! the anomaly labels (vibration_ae), SNR of the logits against the float model and top-1
//! agreement (mobilenetish: random weights). int8 calibrates on `calib_input.npy`, or on the
//! test inputs where the model has none (mobilenetish). Bundles are built with the gate opened
//! wide so every variant is measured; the `gate` column says what the default gate
//! (1 point / 20 dB) decides.

use std::path::{Path, PathBuf};
use std::time::Instant;

use bundler::{BuildError, BuildOptions, Gate, Int8Form, QuantizeMode};
use engine::{EngineOptions, Model, Tensor, TensorData};
use protocol::bundle::{read_bundle_file, MemorySink, VerifyOptions};

struct Variant {
    model: String,
    name: String,
    file_size: u64,
    bundle_size: Option<u64>,
    quality: String,
    gate: String,
    engine: Option<Model>,
    load_error: Option<String>,
    times: Vec<f64>,
}

fn dir(model: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/models")
        .join(model)
}

fn read(model: &str, file: &str) -> Tensor {
    engine::npy::read_npy(&dir(model).join(file)).unwrap()
}

fn labels(model: &str) -> Option<Vec<i64>> {
    let path = dir(model).join("test_labels.npy");
    path.exists()
        .then(|| match engine::npy::read_npy(&path).unwrap().data {
            TensorData::I64(v) => v,
            TensorData::I32(v) => v.into_iter().map(i64::from).collect(),
            _ => panic!("labels"),
        })
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0
}

/// Quality of `out` (all test samples) as the table prints it.
fn quality(model: &str, x: &Tensor, out: &[f32], float: &[f32]) -> String {
    let n = x.shape[0];
    if model == "vibration_ae" {
        let xs = x.as_f32().unwrap();
        let per = xs.len() / n;
        let err: Vec<f64> = (0..n)
            .map(|i| {
                let (a, b) = (&xs[i * per..(i + 1) * per], &out[i * per..(i + 1) * per]);
                a.iter()
                    .zip(b)
                    .map(|(p, q)| f64::from(p - q).powi(2))
                    .sum::<f64>()
                    / per as f64
            })
            .collect();
        let auc = protocol::quality::roc_auc(&err, &labels(model).unwrap());
        return format!("AUC {:.4}", auc.expect("both classes"));
    }
    let classes = out.len() / n;
    if let Some(l) = labels(model) {
        let hits = out
            .chunks(classes)
            .zip(&l)
            .filter(|(r, &y)| argmax(r) as i64 == y)
            .count();
        return format!("acc {:.4}", hits as f64 / n as f64);
    }
    let agree = out
        .chunks(classes)
        .zip(float.chunks(classes))
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count();
    let (mut s, mut e) = (0f64, 0f64);
    for (&a, &b) in float.iter().zip(out) {
        s += f64::from(a).powi(2);
        e += f64::from(a - b).powi(2);
    }
    let snr = if e == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (s / e).log10()
    };
    format!("SNR {snr:.1} dB, top-1 {agree}/{n}")
}

fn run_all(m: &Model, x: &Tensor) -> Vec<f32> {
    let n = x.shape[0];
    let mut out = Vec::new();
    let mut i = 0;
    while i < n {
        let j = (i + 32).min(n);
        let per = x.as_f32().unwrap().len() / n;
        let mut shape = x.shape.clone();
        shape[0] = j - i;
        let part = Tensor::from_f32(shape, x.as_f32().unwrap()[i * per..j * per].to_vec()).unwrap();
        out.extend_from_slice(m.run(&[part]).unwrap()[0].as_f32().unwrap());
        i = j;
    }
    out
}

fn load(bytes: &[u8]) -> Result<Model, String> {
    let f = tempfile::Builder::new().suffix(".onnx").tempfile().unwrap();
    std::fs::write(f.path(), bytes).unwrap();
    Model::load(f.path(), &EngineOptions::default()).map_err(|e| format!("{e:#}"))
}

/// An NNEF bundle's model as the agent installs it: narrow weights put back, then loaded
/// through the NNEF path with the manifest's names.
fn load_installed_nnef(m: &protocol::manifest::Manifest, sink: &MemorySink) -> Model {
    let archive = match &m.narrow_weights {
        Some(n) => {
            protocol::narrow_weights::expand(&sink.0[&m.model_file], &sink.0[&n.file], n).unwrap()
        }
        None => sink.0[&m.model_file].clone(),
    };
    let f = tempfile::Builder::new()
        .suffix(".nnef.tar")
        .tempfile()
        .unwrap();
    std::fs::write(f.path(), archive).unwrap();
    let names = engine::IoNames {
        inputs: m.inputs.iter().map(|s| s.name.clone()).collect(),
        outputs: m.outputs.iter().map(|s| s.name.clone()).collect(),
    };
    Model::load_nnef(f.path(), &names, &EngineOptions::default()).unwrap()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut ort_dir, mut seconds, mut save_dir) = (None, 1.0f64, None::<PathBuf>);
    let mut nnef = false;
    let mut models: Vec<String> = ["digits_mlp", "digits_cnn", "vibration_ae", "mobilenetish"]
        .map(String::from)
        .to_vec();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--ort-dir" => ort_dir = args.next().map(PathBuf::from),
            "--seconds" => seconds = args.next().unwrap().parse().unwrap(),
            "--save-dir" => save_dir = args.next().map(PathBuf::from),
            "--nnef" => nnef = true,
            "--models" => models = args.next().unwrap().split(',').map(String::from).collect(),
            other => panic!("unknown flag {other}"),
        }
    }
    if let Some(d) = &save_dir {
        std::fs::create_dir_all(d).unwrap();
    }
    let work = tempfile::tempdir().unwrap();
    bundler::keygen(work.path(), "k").unwrap();
    let keyring = bundler::load_keyring(&[work.path().join("k.pub")]).unwrap();
    let mut variants: Vec<Variant> = Vec::new();
    for model in &models {
        let x = read(model, "test_input.npy");
        let mut float_out: Option<Vec<f32>> = None;
        let modes: &[(QuantizeMode, Option<Int8Form>)] = if nnef {
            // Static int8 cannot be written as NNEF (tract 0.23.9).
            &[
                (QuantizeMode::None, None),
                (QuantizeMode::Int8Weights, None),
                (QuantizeMode::F16, None),
            ]
        } else {
            &[
                (QuantizeMode::None, None),
                (QuantizeMode::Int8Weights, None),
                (QuantizeMode::Int8, Some(Int8Form::Qdq)),
                (QuantizeMode::Int8, Some(Int8Form::QOperator)),
                (QuantizeMode::F16, None),
            ]
        };
        for &(mode, form) in modes {
            let variant = match form {
                Some(form) => format!("{mode} {form}"),
                None => mode.to_string(),
            };
            let out = work
                .path()
                .join(format!("{model}-{}.mfb", variant.replace(' ', "-")));
            let mut o = BuildOptions::new(
                dir(model).join(format!("{model}.onnx")),
                model.as_str(),
                "1.0.0",
                1,
                work.path().join("k.key"),
                &out,
            );
            o.golden_inputs = Some(dir(model).join("test_input.npy"));
            // Class labels (digits), anomaly labels (vibration_ae: its gate is then the AUC).
            let labels = dir(model).join("test_labels.npy");
            if labels.exists() {
                o.golden_labels = Some(labels);
            }
            let calib = dir(model).join("calib_input.npy");
            o.calibration = Some(if calib.exists() {
                calib
            } else {
                dir(model).join("test_input.npy")
            });
            o.latency_runs = 3;
            o.quantize = mode;
            o.int8_form = form;
            // ONNX: this bench compares ONNX files (ours and onnxruntime's) run by tract.
            o.model_format = Some(if nnef {
                protocol::manifest::ModelFormat::Nnef
            } else {
                protocol::manifest::ModelFormat::Onnx
            });
            o.quality_gate = Gate {
                max_accuracy_drop: 100.0,
                min_snr_db: -1000.0,
            };
            // A model whose golden outputs depend on the batch size is refused by the build;
            // it is measured anyway (built again with the golden tolerance it needs), its gate
            // column saying so.
            let mut unstable = None;
            let report = match bundler::build(&o) {
                Ok(r) => r,
                Err(BuildError::GoldenUnstable { needed_atol, .. }) => {
                    unstable = Some(needed_atol);
                    o.golden_atol = needed_atol * 2.0;
                    match bundler::build(&o) {
                        Ok(r) => r,
                        Err(e) => {
                            eprintln!("{model} {variant}: build failed: {e:#?}");
                            continue;
                        }
                    }
                }
                Err(e) => {
                    eprintln!("{model} {variant}: build failed: {e:#?}");
                    continue;
                }
            };
            let gate = match report.quantization.record() {
                _ if unstable.is_some() => format!(
                    "refused: batch-dependent outputs (needs golden atol {:.2})",
                    unstable.unwrap()
                ),
                None => "-".to_string(),
                Some(r) => {
                    let mut q = r.quality.clone();
                    q.max_accuracy_drop = Gate::default().max_accuracy_drop;
                    q.min_snr_db = q.min_snr_db.map(|_| Gate::default().min_snr_db);
                    match bundler::quality::check(&q) {
                        Ok(()) => "pass".into(),
                        Err(_) => "refused".into(),
                    }
                }
            };
            let mut sink = MemorySink::default();
            let verified =
                read_bundle_file(&out, &VerifyOptions::new(&keyring), &mut sink).unwrap();
            let (m, file_size) = if nnef {
                let compressed: u64 = report
                    .payloads
                    .iter()
                    .filter(|p| p.file != "golden.bin.zst")
                    .map(|p| p.compressed_size)
                    .sum();
                (load_installed_nnef(&verified.manifest, &sink), compressed)
            } else {
                let bytes = &sink.0["model.onnx"];
                if let Some(d) = &save_dir {
                    let file = format!("{model}.{}.onnx", variant.replace(' ', "-"));
                    std::fs::write(d.join(file), bytes).unwrap();
                }
                (load(bytes).unwrap(), bytes.len() as u64)
            };
            let y = run_all(&m, &x);
            let float = float_out.get_or_insert_with(|| y.clone()).clone();
            variants.push(Variant {
                model: model.clone(),
                name: format!("ours {}{variant}", if nnef { "nnef " } else { "" }),
                file_size,
                bundle_size: Some(report.size),
                quality: quality(model, &x, &y, &float),
                gate,
                engine: Some(m),
                load_error: None,
                times: vec![],
            });
        }
        let Some(ort) = &ort_dir else { continue };
        for v in ["dynamic", "qdq", "qop"] {
            let path = ort.join(format!("{model}.{v}.onnx"));
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            let (engine, load_error, quality_text) = match load(&bytes) {
                Ok(m) => {
                    let y = run_all(&m, &x);
                    let q = quality(model, &x, &y, float_out.as_deref().unwrap_or(&y));
                    (Some(m), None, q)
                }
                Err(e) => (None, Some(e), "-".into()),
            };
            variants.push(Variant {
                model: model.clone(),
                name: format!("onnxruntime {v} in tract"),
                file_size: bytes.len() as u64,
                bundle_size: None,
                quality: quality_text,
                gate: "-".into(),
                engine,
                load_error,
                times: vec![],
            });
        }
    }
    // Latency: batch 1, first test sample; round-robin over variants of a model, 5 rounds.
    for model in &models {
        let x = read(model, "test_input.npy");
        let per = x.as_f32().unwrap().len() / x.shape[0];
        let mut shape = x.shape.clone();
        shape[0] = 1;
        let one = Tensor::from_f32(shape, x.as_f32().unwrap()[..per].to_vec()).unwrap();
        for _ in 0..5 {
            for v in variants.iter_mut().filter(|v| &v.model == model) {
                let Some(m) = &v.engine else { continue };
                for _ in 0..3 {
                    m.run(std::slice::from_ref(&one)).unwrap();
                }
                let start = Instant::now();
                while start.elapsed().as_secs_f64() < seconds / 5.0 || v.times.len() % 5 != 0 {
                    let t = Instant::now();
                    m.run(std::slice::from_ref(&one)).unwrap();
                    v.times.push(t.elapsed().as_secs_f64() * 1e6);
                }
            }
        }
    }
    println!("| model | variant | model file | bundle | quality | gate | latency p50 | p95 |");
    println!("|---|---|---|---|---|---|---|---|");
    for v in &mut variants {
        v.times.sort_by(f64::total_cmp);
        let pick = |q: f64| {
            v.times
                .get(((v.times.len() as f64 - 1.0) * q).round() as usize)
                .copied()
        };
        let fmt = |t: Option<f64>| match t {
            Some(t) if t >= 1000.0 => format!("{:.2} ms", t / 1000.0),
            Some(t) => format!("{t:.1} µs"),
            None => v.load_error.clone().map_or("-".into(), |e| {
                format!("does not load: {}", e.chars().take(80).collect::<String>())
            }),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            v.model,
            v.name,
            v.file_size,
            v.bundle_size.map_or("-".into(), |s| s.to_string()),
            v.quality,
            v.gate,
            fmt(pick(0.5)),
            fmt(pick(0.95)),
        );
    }
}
