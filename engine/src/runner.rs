//! A plan plus a pool of execution states reused across calls.

use std::sync::Mutex;

use tract_nnef::prelude::*;

/// States kept for reuse. More concurrent calls than this still work; the extra states are
/// dropped after use.
const POOL_CAP: usize = 8;

/// One optimised plan and the idle states spawned from it.
///
/// A `SimpleState` is `Send` but not `Sync`, so each call takes one out of the mutex-guarded
/// pool (or spawns a fresh one), runs on it without holding the lock, and puts it back.
pub(crate) struct Runner {
    plan: Arc<TypedRunnableModel>,
    idle: Mutex<Vec<TypedSimpleState>>,
}

impl Runner {
    pub(crate) fn new(plan: Arc<TypedRunnableModel>) -> Runner {
        Runner {
            plan,
            idle: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn run(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let pooled = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut state = match pooled {
            Some(state) => state,
            None => self.plan.spawn()?,
        };
        // On error the state may hold a half-done turn: let it drop rather than reuse it.
        let outputs = state.run(inputs)?;
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < POOL_CAP {
            idle.push(state);
        }
        Ok(outputs)
    }
}
