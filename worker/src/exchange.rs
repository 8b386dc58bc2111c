//! A shard's end of an exact-mode exchange over the network: the engine's
//! [`stylefarm_engine::shard::Exchange`] as calls of WorkerService.Exchange on the coordinator, which adds
//! up the parts of the scale's shards.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use stylefarm_core::ids::LeaseId;
use stylefarm_engine::shard::Exchange;
use stylefarm_proto::connect::AuthChannel;
use stylefarm_proto::exchange;
use stylefarm_proto::pb;
use stylefarm_proto::pb::worker_service_client::WorkerServiceClient;
use tch::{Device, Kind, Tensor};
use tokio_stream::StreamExt;

/// One shard task's exchange: its lease, the task's cancel flag, and the number of its next call.
pub(crate) struct RemoteExchange {
    runtime: tokio::runtime::Handle,
    client: WorkerServiceClient<AuthChannel>,
    lease: LeaseId,
    cancel: Arc<AtomicBool>,
    call: u64,
}

/// How often a call waiting on the coordinator looks at the task's cancel flag (set when the job is
/// cancelled or the lease is lost, e.g. the coordinator went silent).
const CANCEL_CHECK: Duration = Duration::from_millis(500);

impl RemoteExchange {
    /// The exchange of the shard task under `lease`, its calls made on `runtime` (from the engine thread,
    /// which is not one of the runtime's); a call gives up once `cancel` is set.
    pub(crate) fn new(
        runtime: tokio::runtime::Handle,
        client: WorkerServiceClient<AuthChannel>,
        lease: LeaseId,
        cancel: Arc<AtomicBool>,
    ) -> RemoteExchange {
        RemoteExchange {
            runtime,
            client,
            lease,
            cancel,
            call: 0,
        }
    }
}

fn error(message: impl std::fmt::Display) -> stylefarm_engine::Error {
    stylefarm_engine::Error::Exchange(message.to_string())
}

impl Exchange for RemoteExchange {
    fn sum(&mut self, parts: Vec<(u64, Tensor)>) -> Result<Vec<Tensor>, stylefarm_engine::Error> {
        // a shard's engine that hangs between two calls, holding its group back ("exchange-call=sleep(N)")
        fail::fail_point!("exchange-call");
        let device = parts.first().map_or(Device::Cpu, |(_, t)| t.device());
        let shapes: Vec<(u64, Vec<i64>)> = parts.iter().map(|(k, t)| (*k, t.size())).collect();
        let mut messages = vec![pb::ExchangeRequest {
            part: Some(pb::exchange_request::Part::Header(pb::ExchangeHeader {
                lease_id: self.lease.to_string(),
                call: self.call,
            })),
        }];
        for (key, t) in &parts {
            let values = Vec::<f32>::try_from(
                &t.f_to_device(Device::Cpu)?
                    .f_to_kind(Kind::Float)?
                    .f_flatten(0, -1)?,
            )?;
            for chunk in exchange::chunks(&values) {
                messages.push(pb::ExchangeRequest {
                    part: Some(pb::exchange_request::Part::Data(pb::ExchangePart {
                        key: *key,
                        values: chunk,
                    })),
                });
            }
        }
        // the values the sums hold, as many as the parts sent: a reply past them is refused as it comes
        let expected: usize = (shapes.iter())
            .map(|(_, shape)| shape.iter().product::<i64>().max(0) as usize)
            .sum();
        let mut client = self.client.clone();
        let cancel = self.cancel.clone();
        let stopped = async move {
            while !cancel.load(Ordering::Relaxed) {
                tokio::time::sleep(CANCEL_CHECK).await;
            }
        };
        let call = async move {
            let mut replies = client
                .exchange(tokio_stream::iter(messages))
                .await
                .map_err(|s| error(s.message()))?
                .into_inner();
            let (mut sums, mut received) = (exchange::Parts::new(), 0usize);
            while let Some(reply) = replies.next().await {
                let part = reply
                    .map_err(|s| error(s.message()))?
                    .part
                    .unwrap_or_default();
                received = received.saturating_add(part.values.len() / 4);
                if received > expected {
                    return Err(error(format!(
                        "the coordinator sent more than the {expected} values of the parts' sums"
                    )));
                }
                exchange::append(&mut sums, part.key, &part.values);
            }
            Ok::<_, stylefarm_engine::Error>(sums)
        };
        let sums: exchange::Parts = self.runtime.block_on(async move {
            tokio::select! {
                sums = call => sums,
                () = stopped => Err(error("the task was cancelled, or its lease is gone")),
            }
        })?;
        self.call += 1;
        shapes
            .iter()
            .map(|(key, shape)| {
                let values = sums
                    .iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v)
                    .ok_or_else(|| error(format!("the coordinator sent no sum of key {key}")))?;
                let n: i64 = shape.iter().product();
                if values.len() as i64 != n {
                    return Err(error(format!(
                        "the sum of key {key} has {} values, the part {n}",
                        values.len()
                    )));
                }
                Ok(Tensor::f_from_slice(values)?
                    .f_reshape(shape.as_slice())?
                    .f_to_device(device)?)
            })
            .collect()
    }
}
