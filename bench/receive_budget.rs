//! The coordinator's memory under many large uploads at once: STREAMS concurrent UploadImage calls of MIB
//! MiB each (1-MiB chunks of junk: the memory is held while they arrive; the decode then refuses them),
//! against a `stylefarm coordinator` process (the binary in STYLEFARM_BIN, absolute or from the workspace's
//! root; by default target/release/stylefarm: `cargo build --release -p stylefarm` first) on 127.0.0.1
//! with a data dir of its own. Prints how the calls ended (gRPC
//! codes) and the coordinator's resident memory before and at its peak (VmHWM, /proc).
//!
//!     cargo bench -p stylefarm-coordinator --bench receive_budget -- [STREAMS] [MIB] [--declare-size]
//!
//! Defaults: 8 streams of 400 MiB, their sizes not declared. With the receive budget (2 GiB of uploads,
//! 1.5 GiB of them one tenant's), the undeclared calls past it are answered UNAVAILABLE with a RetryInfo
//! and the peak stays near the budget; without one, the peak grows with STREAMS x MIB. With
//! `--declare-size` each call declares its size first (`size_bytes`, as `FarmClient::upload` does): its
//! bytes are set aside at once, or it is refused before its data are read, never part-way.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use stylefarm_proto::pb;
use stylefarm_proto::pb::render_service_client::RenderServiceClient;

/// A field of /proc/PID/status in KiB (VmRSS, VmHWM).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let streams = args.first().copied().unwrap_or(8);
    let mib = args.get(1).copied().unwrap_or(400);
    let declare = std::env::args().any(|a| a == "--declare-size");
    // a relative path from the workspace's root (cargo runs benches in the package's directory)
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = root
        .join(std::env::var("STYLEFARM_BIN").unwrap_or_else(|_| "target/release/stylefarm".into()));
    let bin = bin.display().to_string();
    let data = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let mut coordinator = std::process::Command::new(&bin)
        .args(["coordinator", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(data.path())
        .env("STYLEFARM_LOG", "warn")
        .spawn()
        .unwrap_or_else(|e| panic!("{bin}: {e}"));
    let pid = coordinator.id();
    let client = loop {
        match RenderServiceClient::connect(url.clone()).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = status_kib(pid, "VmRSS");
    let start = Instant::now();
    let calls: Vec<_> = (0..streams)
        .map(|s| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let size = declare.then_some(pb::UploadImageRequest {
                    part: Some(pb::upload_image_request::Part::SizeBytes(
                        (mib << 20) as u64,
                    )),
                });
                let chunks = (0..mib).map(move |i| pb::UploadImageRequest {
                    part: Some(pb::upload_image_request::Part::Data(vec![
                        (s * 31 + i) as u8;
                        1 << 20
                    ])),
                });
                let parts = size.into_iter().chain(chunks);
                let ended = client.upload_image(tokio_stream::iter(parts)).await;
                match ended {
                    Ok(_) => tonic::Code::Ok,
                    Err(s) => s.code(),
                }
            })
        })
        .collect();
    let mut ended = BTreeMap::new();
    for call in calls {
        *ended
            .entry(format!("{:?}", call.await.unwrap()))
            .or_insert(0) += 1;
    }
    let wall = start.elapsed();
    let peak = status_kib(pid, "VmHWM");
    coordinator.kill().ok();
    coordinator.wait().ok();
    println!(
        "{streams} uploads of {mib} MiB at once ({} MiB in all{}): ended {ended:?} in {:.1} s; \
         coordinator resident memory {} MiB before, {} MiB at its peak",
        streams * mib,
        if declare { ", sizes declared" } else { "" },
        wall.as_secs_f64(),
        before >> 10,
        peak >> 10
    );
}
