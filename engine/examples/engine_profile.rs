//! Where the time goes: per-node timings of the batch-1 plan the engine builds.
//!
//! `cargo run --release -p modelfleet-engine --example engine_profile -- mobilenetish [runs] [FILE.onnx [nnef]]`
//!
//! With `FILE.onnx`, profiles that file (e.g. a quantized variant of the model, as
//! `quant_bench --save-dir` writes them) on the named model's first test input; with a fourth
//! argument `nnef`, profiles that file converted to NNEF and read back, as a device loads it.
//! With `PROFILE_ALL` set in the environment, also prints every node's median time in plan order.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use tract_onnx::prelude::*;

fn main() -> TractResult<()> {
    let name = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "mobilenetish".into());
    let runs: usize = std::env::args()
        .nth(2)
        .map(|s| s.parse().unwrap())
        .unwrap_or(20);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/models")
        .join(&name);
    let file = std::env::args()
        .nth(3)
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.join(format!("{name}.onnx")));
    let typed = if std::env::args().nth(4).as_deref() == Some("nnef") {
        // As a device loads it: converted to NNEF (what the bundler ships), read back.
        let (archive, _) = engine::onnx_to_nnef(&file, &std::fs::read(&file)?).unwrap();
        use tract_onnx_opl::WithOnnx;
        tract_nnef::nnef()
            .with_onnx()
            .model_for_read(&mut std::io::Cursor::new(archive))?
    } else {
        tract_onnx::onnx()
            .model_for_path(&file)?
            .into_typed()?
            .into_decluttered()?
    };
    let n = typed.symbols.sym("N");
    let model = typed.set_symbols(&[(n, TDim::Val(1))].into_iter().collect())?;
    // The engine's own declutter, passes and optimisation, as `Model::load` runs them.
    let model = engine::internals::optimize(model)?;
    let plan = model.into_runnable()?;
    let input = engine::npy::read_npy(dir.join("test_input.npy")).unwrap();
    let row: usize = input.shape[1..].iter().product();
    let mut shape = input.shape.clone();
    shape[0] = 1;
    let x = Tensor::from_shape(&shape, &input.as_f32().unwrap()[..row])?;
    let mut state = plan.spawn()?;
    let mut per_node: HashMap<usize, f64> = HashMap::new();
    let mut samples: HashMap<usize, Vec<f64>> = HashMap::new();
    let mut whole = vec![];
    for _ in 0..runs {
        let started = Instant::now();
        state.run_plan_with_eval(tvec!(x.clone().into()), |ctx, st, node, inputs| {
            let t = Instant::now();
            let r = tract_onnx::tract_core::plan::eval(ctx, st, node, inputs);
            let us = t.elapsed().as_secs_f64() * 1e6;
            *per_node.entry(node.id).or_default() += us;
            samples.entry(node.id).or_default().push(us);
            r
        })?;
        whole.push(started.elapsed().as_secs_f64() * 1e6);
    }
    whole.sort_by(f64::total_cmp);
    println!("whole run median {:.1} µs", whole[whole.len() / 2]);
    let model = plan.model();
    let mut by_op: HashMap<String, (f64, usize)> = HashMap::new();
    let mut rows: Vec<_> = per_node
        .iter()
        .map(|(id, t)| (*t / runs as f64, *id))
        .collect();
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    let total: f64 = rows.iter().map(|r| r.0).sum();
    println!("total {total:.1} µs over {} nodes", rows.len());
    for (t, id) in &rows {
        let node = model.node(*id);
        let e = by_op.entry(node.op().name().to_string()).or_default();
        e.0 += t;
        e.1 += 1;
    }
    let mut ops: Vec<_> = by_op.into_iter().collect();
    ops.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    for (op, (t, c)) in ops {
        println!("{op:<30} {t:>10.1} µs {:>5.1}% x{c}", 100.0 * t / total);
    }
    println!("--- top nodes");
    for (t, id) in rows.iter().take(15) {
        let node = model.node(*id);
        println!(
            "{t:>9.1} µs  {} {}  in={:?}",
            node.name,
            node.op().name(),
            model
                .node_input_facts(*id)?
                .iter()
                .map(|f| format!("{:?}", f.shape))
                .collect::<Vec<_>>()
        );
    }
    if std::env::var_os("PROFILE_ALL").is_some() {
        // Every node in plan order (for a per-layer table against onnxruntime's profile).
        println!("--- all nodes (median over the runs)");
        for id in plan.order_without_consts() {
            let node = model.node(*id);
            let mut t = samples.get(id).cloned().unwrap_or_default();
            t.sort_by(f64::total_cmp);
            let median = t.get(t.len() / 2).copied().unwrap_or(0.0);
            println!("{median:>9.1} µs  {} {}", node.name, node.op().name());
        }
    }
    Ok(())
}
