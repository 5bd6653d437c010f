//! Per-request latency of `engine::Model` at batch 1 on the reference models, plus load time.
//!
//! ```text
//! cargo run --release -p modelfleet-engine --example engine_bench -- \
//!     [--threads N] [--cache DIR] [--seconds S] [--models digits_mlp,digits_cnn,mobilenetish] [--stock]
//!     [--runs N]
//! ```
//! `--stock` also times plain tract (`into_optimized` symbolic plan, `plan.run` per call) for
//! comparison. Output: one line per model, times in microseconds.
//!
//! `--runs N` times nothing: it loads each model once and runs it exactly N times, for
//! instruction counts under `valgrind --tool=callgrind` (the count of `--runs 0`, load only,
//! subtracted from that of `--runs N` and divided by N is the cost of one request).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use engine::npy::read_npy;
use engine::{EngineOptions, Model, Tensor};

struct Args {
    threads: usize,
    cache: Option<PathBuf>,
    seconds: f64,
    models: Vec<String>,
    stock: bool,
    runs: Option<usize>,
}

fn args() -> Args {
    let mut a = Args {
        threads: 1,
        cache: None,
        seconds: 3.0,
        models: vec![
            "digits_mlp".into(),
            "digits_cnn".into(),
            "mobilenetish".into(),
        ],
        stock: false,
        runs: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--threads" => a.threads = value().parse().expect("--threads N"),
            "--cache" => a.cache = Some(value().into()),
            "--seconds" => a.seconds = value().parse().expect("--seconds S"),
            "--models" => a.models = value().split(',').map(str::to_owned).collect(),
            "--stock" => a.stock = true,
            "--runs" => a.runs = Some(value().parse().expect("--runs N")),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn dir(model: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/models")
        .join(model)
}

/// Median and 95th percentile (µs) of timing `f` repeatedly for about `seconds`.
fn time(seconds: f64, mut f: impl FnMut()) -> (f64, f64, usize) {
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_secs_f64(seconds / 5.0) {
        f();
    }
    let mut samples = vec![];
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs_f64(seconds) || samples.len() < 20 {
        let t = Instant::now();
        f();
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    let pick = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (pick(0.5), pick(0.95), samples.len())
}

fn first_sample(t: &Tensor) -> Tensor {
    let row: usize = t.shape[1..].iter().product();
    let mut shape = t.shape.clone();
    shape[0] = 1;
    Tensor::from_f32(shape, t.as_f32().unwrap()[..row].to_vec()).unwrap()
}

fn stock(path: &std::path::Path, input: &Tensor, seconds: f64) -> (f64, f64) {
    use tract_onnx::prelude::*;
    let plan = tract_onnx::onnx()
        .model_for_path(path)
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let x = tract_onnx::prelude::Tensor::from_shape(&input.shape, input.as_f32().unwrap()).unwrap();
    let (median, p95, _) = time(seconds, || {
        plan.run(tvec!(x.clone().into())).unwrap();
    });
    (median, p95)
}

fn main() {
    let a = args();
    let opts = EngineOptions {
        threads: a.threads,
        cache_dir: a.cache.clone(),
        ..EngineOptions::default()
    };
    println!(
        "# engine_bench threads={} cache={:?} batch=1 (times in µs; load in ms)",
        a.threads, a.cache
    );
    for name in &a.models {
        let path = dir(name).join(format!("{name}.onnx"));
        if let Some(runs) = a.runs {
            let model = Model::load(&path, &opts).unwrap();
            let inputs = [first_sample(
                &read_npy(dir(name).join("test_input.npy")).unwrap(),
            )];
            for _ in 0..runs {
                model.run(&inputs).unwrap();
            }
            println!("engine {name:<14} runs {runs}");
            continue;
        }
        let mut loads = vec![];
        let mut model = None;
        for _ in 0..3 {
            let t = Instant::now();
            let m = Model::load(&path, &opts).unwrap();
            loads.push(t.elapsed().as_secs_f64() * 1e3);
            model = Some(m);
        }
        let model = model.unwrap();
        loads.sort_by(f64::total_cmp);
        let input = first_sample(&read_npy(dir(name).join("test_input.npy")).unwrap());
        let inputs = [input.clone()];
        let (median, p95, n) = time(a.seconds, || {
            model.run(&inputs).unwrap();
        });
        print!(
            "engine {name:<14} median_us {median:>10.1} p95_us {p95:>10.1} n {n:>7} load_ms {:>8.1} from_cache {}",
            loads[1],
            model.loaded_from_cache()
        );
        if a.stock {
            let (sm, sp) = stock(&path, &input, a.seconds);
            print!(" stock_median_us {sm:.1} stock_p95_us {sp:.1}");
        }
        println!();
    }
}
