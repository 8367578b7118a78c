//! The worker: runs subgraphs that peers send, at most `slots` at a time, on the node's backend
//! through the SDK's local executor (which caches results by subgraph id).

use std::sync::Arc;
use std::time::Instant;

use corvid_sdk::LocalExecutor;
use corvid_sdk::wire::{Input, TASK_VERSION, TaskRequest, TaskResponse};
use libp2p::PeerId;
use libp2p::request_response::ResponseChannel;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::Fault;
use crate::net::event_loop::Command;

/// One request to run, with the channel its answer goes back on.
#[derive(Debug)]
pub(crate) struct Work {
    pub peer: PeerId,
    pub request: TaskRequest,
    pub channel: ResponseChannel<TaskResponse>,
}

/// Runs work items until cancelled or the queue closes; answers go back through the event loop.
pub(crate) async fn run(
    mut queue: mpsc::Receiver<Work>,
    commands: mpsc::Sender<Command>,
    executor: Arc<LocalExecutor>,
    slots: usize,
    fault: Option<Fault>,
    cancel: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(slots.max(1)));
    // A hanging test worker keeps the channels it never answers on.
    let mut hung = Vec::new();
    loop {
        let work = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            w = queue.recv() => match w {
                Some(w) => w,
                None => break,
            },
        };
        if fault == Some(Fault::Hang) {
            hung.push(work.channel);
            continue;
        }
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let executor = executor.clone();
        let commands = commands.clone();
        tokio::spawn(async move {
            let Work {
                peer,
                request,
                channel,
            } = work;
            let task = request.task;
            let response = tokio::task::spawn_blocking(move || execute(&executor, request))
                .await
                .unwrap_or_else(|e| TaskResponse::Failed {
                    task,
                    error: format!("worker panicked: {e}"),
                });
            drop(permit);
            if let TaskResponse::Failed { error, .. } = &response {
                tracing::warn!(%peer, task, %error, "task failed");
            }
            let _ = commands.send(Command::Respond { channel, response }).await;
        });
    }
}

/// Checks and runs one request.
pub(crate) fn execute(executor: &LocalExecutor, request: TaskRequest) -> TaskResponse {
    let task = request.task;
    let fail = |error: String| TaskResponse::Failed { task, error };
    if request.version != TASK_VERSION {
        return fail(format!(
            "task protocol version {} is not {TASK_VERSION}",
            request.version
        ));
    }
    if !request.id_matches() {
        return fail(format!(
            "subgraph id {} does not match its program and inputs",
            request.subgraph.short()
        ));
    }
    if request.inputs.len() != request.program.inputs.len()
        || request.input_ids.len() != request.inputs.len()
    {
        return fail(format!(
            "the program takes {} inputs, the task carries {} (and {} ids)",
            request.program.inputs.len(),
            request.inputs.len(),
            request.input_ids.len()
        ));
    }
    let held: Vec<usize> = (0..request.inputs.len())
        .filter(|&i| matches!(request.inputs[i], Input::Held))
        .collect();
    if !held.is_empty() {
        return TaskResponse::Missing { task, inputs: held };
    }
    let inputs: Vec<Arc<corvid_kernels::Tensor>> = request
        .inputs
        .into_iter()
        .map(|i| match i {
            Input::Data(t) => Arc::new(t),
            Input::Held => unreachable!("held inputs answered above"),
        })
        .collect();
    // Cache by the subgraph id *and* the content of the inputs actually sent: a requester
    // cannot plant a result under an id that other requesters will ask for.
    let mut key = blake3::Hasher::new();
    key.update(&request.subgraph.0);
    for t in &inputs {
        key.update(&t.content_id().0);
    }
    let key = corvid_sdk::SubgraphId(*key.finalize().as_bytes());
    let started = Instant::now();
    match executor.run_program(key, &request.program, &inputs) {
        Ok(outputs) => TaskResponse::Done {
            task,
            outputs: outputs.iter().map(|t| (**t).clone()).collect(),
            compute_micros: started.elapsed().as_micros() as u64,
        },
        Err(e) => fail(e.to_string()),
    }
}
