//! The farm end to end: real coordinator and worker processes on 127.0.0.1, the real engine and weights.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use stylefarm_coordinator::blobs::S3Server;
use stylefarm_coordinator::store::RedisServer;
use stylefarm_proto::pb;
use stylefarm_proto::pb::job_spec::Kind;
use stylefarm_tests::{
    batch_x_starry, exact_x_starry, file_names, is, iteration, job, metric_value, metrics_addr,
    path, pixel_difference, scrape, shared_image, submit, tubingen_x_starry, two_shards_x_starry,
    wait_for, wait_iteration, wait_job, wait_registered, wait_state, wait_succeeded, x_starry,
    Cluster,
};
use tonic::Code;

type RenderClient = stylefarm_client::FarmClient;

/// A job submitted with --worker-tag goes only to the workers with that tag (a worker's tags from
/// STYLEFARM_WORKER_TAGS); a folder given as --content is a batch of its images; a bad tag is refused,
/// naming the field; a job whose tags no live worker has says why it waits (GetJob, `stylefarm status`
/// and `list`). The second submit of the same images uploads none (stderr says so).
#[tokio::test(flavor = "multi_thread")]
async fn a_tagged_batch_of_a_folder_runs_only_on_the_tagged_worker() {
    let mut cluster = Cluster::start(10.0, 0.5);
    cluster.add_worker("plain");
    cluster.add_worker_with_env("big", &[("STYLEFARM_WORKER_TAGS", "gpu,a100")]);
    wait_registered(&cluster, 2).await;
    let photos = cluster.dir.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    for name in ["tubingen.jpg", "chelsea.png"] {
        std::os::unix::fs::symlink(path(name), photos.join(name)).unwrap();
    }
    let submit = |tag: &str, wait: bool| {
        let style = path("starry_night.jpg");
        let mut args = vec![
            "submit",
            "--content",
            photos.to_str().unwrap(),
            "--style",
            &style,
            "--batch",
            "--worker-tag",
            tag,
            "--size",
            "32",
            "--iterations",
            "2",
        ];
        if wait {
            args.push("--wait");
        }
        cluster.cli(&args)
    };
    // no live worker has tpu: the job waits, and says why
    let (ok, stdout, err) = submit("tpu", false);
    assert!(ok, "{err}");
    assert!(err.contains("3 image(s) uploaded\n"), "{err}");
    let waiting_id = stdout.trim().to_string();
    let mut client = cluster.client().await;
    let status = job(&mut client, &waiting_id).await;
    assert_eq!(
        status.waiting,
        "no live worker has the worker tags it asks for (tpu): the live ones have tags a100,gpu; none; \
         it waits for one that has"
    );
    let (ok, stdout, err) = cluster.cli(&["status", &waiting_id]);
    assert!(
        ok && stdout.contains("waiting: no live worker has the worker tags"),
        "{stdout} {err}"
    );
    let (ok, stdout, err) = cluster.cli(&["list"]);
    assert!(
        ok && stdout.contains("waiting: no live worker"),
        "{stdout} {err}"
    );
    // `watch` (and `submit --wait`) says why too, on a stderr that is not a terminal, where it draws no
    // progress bars
    let watch_err = cluster.dir.path().join("watch.err");
    let mut watch = stylefarm_tests::stylefarm()
        .args(["watch", &waiting_id])
        .env("STYLEFARM_COORDINATOR", &cluster.url)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&watch_err).unwrap())
        .spawn()
        .unwrap();
    wait_for("watch to say why", Duration::from_secs(30), || async {
        let err = std::fs::read_to_string(&watch_err).unwrap_or_default();
        err.contains("waiting: no live worker has the worker tags")
            .then_some(())
    })
    .await;
    let _ = watch.kill();
    let _ = watch.wait();
    let (ok, _, err) = cluster.cli(&["cancel", &waiting_id]);
    assert!(ok, "{err}");
    assert_eq!(job(&mut client, &waiting_id).await.waiting, "", "cancelled");

    let (ok, stdout, err) = submit("gpu", true);
    assert!(ok, "{err}");
    assert!(
        err.contains("0 image(s) uploaded, 3 already on the coordinator"),
        "{err}"
    );
    let status = job(&mut client, stdout.lines().next().unwrap().trim()).await;
    assert!(is(&status, pb::JobState::Succeeded), "{status:?}");
    let labels: Vec<&str> = status.tasks.iter().map(|t| t.label.as_str()).collect();
    assert_eq!(labels.len(), 2, "{labels:?}");
    assert!(
        status.tasks.iter().all(|t| t.worker_id.starts_with("big")),
        "{:?}",
        status.tasks
    );
    let (ok, _, err) = submit("no way", true);
    assert!(!ok && err.contains("worker_tags"), "{err}");
}

/// A video of 5 frames in chunks of 2 on two workers: the chunks' first frames render afresh, each other
/// frame starts from the result of the frame before it (its previous frame on the wire), the job's result
/// is the last frame, and the frames are written as frame-NNNNN.png; a bad chunk size names its field.
#[tokio::test(flavor = "multi_thread")]
async fn a_video_renders_each_frame_from_the_one_before_its_chunks_side_by_side() {
    let mut cluster = Cluster::start(10.0, 0.5);
    cluster.add_worker("w1");
    cluster.add_worker("w2");
    wait_registered(&cluster, 2).await;
    let frames = cluster.dir.path().join("frames");
    std::fs::create_dir(&frames).unwrap();
    // a clip: tubingen at 64 x 48 with a dark square moving across it (frames 1 and 2 the same)
    let still = stylefarm_core::imaging::resize_longest(
        &stylefarm_core::imaging::load(&shared_image("tubingen.jpg")).unwrap(),
        64,
    );
    for (i, x) in [0u32, 0, 12, 24, 36].into_iter().enumerate() {
        let mut frame = still.clone();
        for (px, py, p) in frame.enumerate_pixels_mut() {
            if (x..x + 12).contains(&px) && (18..30).contains(&py) {
                *p = image::Rgb([20, 20, 20]);
            }
        }
        stylefarm_core::imaging::save(&frame, &frames.join(format!("{i:05}.png"))).unwrap();
    }
    let out = cluster.dir.path().join("video");
    let submit_video = |frames: &std::path::Path, chunk: &str, out: &std::path::Path| {
        cluster.cli(&[
            "submit",
            "--content",
            frames.to_str().unwrap(),
            "--style",
            &path("starry_night.jpg"),
            "--video",
            "--chunk-frames",
            chunk,
            "--frame-iterations",
            "2",
            "--size",
            "32",
            "--iterations",
            "4",
            "--wait",
            "-o",
            out.to_str().unwrap(),
        ])
    };
    let video = |chunk: &str| submit_video(&frames, chunk, &out);
    let (ok, stdout, err) = video("2");
    assert!(ok, "{err}");
    // its stderr is not a terminal: no bars, a line for each task's end
    assert_eq!(err.matches(") succeeded\n").count(), 5, "{err}");
    let mut client = cluster.client().await;
    let status = job(&mut client, stdout.lines().next().unwrap().trim()).await;
    assert!(is(&status, pb::JobState::Succeeded), "{status:?}");
    let contents = status.spec.as_ref().unwrap().contents.clone();
    let frame_of = |i: u32| {
        status
            .tasks
            .iter()
            .find(|t| t.frame.as_ref().unwrap().index == i)
            .unwrap_or_else(|| panic!("frame {i}: {:?}", status.tasks))
    };
    assert_eq!(status.tasks.len(), 5);
    for i in 0..5 {
        let f = frame_of(i).frame.as_ref().unwrap();
        assert_eq!(f.frames, 5);
        if i % 2 == 0 {
            assert!(f.previous_result.is_empty(), "frame {i} starts its chunk");
        } else {
            assert_eq!(f.previous_result, frame_of(i - 1).result, "frame {i}");
            assert_eq!(f.previous_content, contents[i as usize - 1]);
        }
    }
    assert_eq!(status.result, frame_of(4).result);
    let written = file_names(&out);
    assert_eq!(
        written,
        (1..=5)
            .map(|i| format!("frame-{i:05}.png"))
            .collect::<Vec<_>>()
    );
    let (ok, _, err) = video("5000");
    assert!(!ok && err.contains("chunk_frames"), "{err}");
    // 0 is not a chunk's frames (one chunk is the default)
    let (ok, _, err) = video("0");
    assert!(
        !ok && err.contains("'--chunk-frames <CHUNK_FRAMES>'"),
        "{err}"
    );
    // refused before anything renders: an image file as the output, frames of two sizes, a folder with
    // another render's later frames (ffmpeg would read them on)
    let (ok, _, err) = submit_video(&frames, "2", &out.join("video.png"));
    assert!(!ok && err.contains("output"), "{err}");
    std::fs::write(out.join("frame-00006.png"), b"").unwrap();
    let (ok, _, err) = submit_video(&frames, "2", &out);
    assert!(
        !ok && err.contains("past this video's 5 (frame-00006.png"),
        "{err}"
    );
    let mixed = cluster.dir.path().join("mixed");
    std::fs::create_dir(&mixed).unwrap();
    for (i, name) in ["tubingen.jpg", "chelsea.png"].iter().enumerate() {
        let ext = name.rsplit('.').next().unwrap();
        std::os::unix::fs::symlink(path(name), mixed.join(format!("{i:05}.{ext}"))).unwrap();
    }
    let (ok, _, err) = submit_video(&mixed, "2", &cluster.dir.path().join("mixed-out"));
    assert!(
        !ok && err.contains("contents") && err.contains("one size"),
        "{err}"
    );
}

/// `stylefarm watch JOB --preview-dir D` (WatchJob with previews): the running task's previews, which its
/// worker sends every --preview-secs, land in D as task-0.png while the job runs, a PNG of at most 256 px a
/// side, with a new file's permissions (not tempfile's 0600); the watch ends with the job.
#[tokio::test(flavor = "multi_thread")]
async fn watch_writes_the_running_tasks_previews() {
    let mut cluster = Cluster::new(10.0, 0.3, "embedded");
    cluster.coordinator_args = ["--preview-secs", "0.3"].map(String::from).into();
    cluster.start_coordinator();
    cluster.add_worker("w");
    wait_registered(&cluster, 1).await;
    let id = submit(&cluster, &tubingen_x_starry(96, 80));
    let dir = cluster.dir.path().join("previews");
    let (ok, _, err) = cluster.cli(&["watch", &id, "--preview-dir", dir.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(err.contains("succeeded"), "{err}");
    assert_eq!(file_names(&dir), ["task-0.png"]);
    use std::os::unix::fs::PermissionsExt;
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    std::fs::write(cluster.dir.path().join("new"), b"").unwrap();
    assert_eq!(
        mode(&dir.join("task-0.png")),
        mode(&cluster.dir.path().join("new"))
    );
    let preview = image::open(dir.join("task-0.png")).unwrap();
    assert!(
        preview.width() <= 256 && preview.height() <= 256 && preview.width() > 16,
        "{:?}",
        (preview.width(), preview.height())
    );
}

/// `submit --max-workers 1`: a batch of two on two idle workers runs one task at a time, the second
/// queued while the first renders, and the job keeps its limit.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_with_max_workers_runs_no_more_tasks_at_once() {
    let mut cluster = Cluster::start(10.0, 0.3);
    cluster.add_worker("w1");
    cluster.add_worker("w2");
    wait_registered(&cluster, 2).await;
    let id = submit(
        &cluster,
        &[
            "--content",
            &path("tubingen.jpg"),
            "--content",
            &path("chelsea.png"),
            "--style",
            &path("starry_night.jpg"),
            "--batch",
            "--max-workers",
            "1",
            "--size",
            "64",
            "--iterations",
            "40",
        ],
    );
    let client = cluster.client().await;
    let running = |s: &pb::JobStatus, state: pb::TaskState| {
        s.tasks.iter().filter(|t| t.state == state as i32).count()
    };
    // one renders, past a few iterations, while the other stays queued with a worker idle
    wait_job(
        &client,
        &id,
        "a task rendering",
        Duration::from_secs(60),
        |s| s.tasks.iter().any(|t| iteration(t) >= 3),
    )
    .await;
    let status = job(&mut client.clone(), &id).await;
    assert_eq!(
        running(&status, pb::TaskState::Running),
        1,
        "{:?}",
        status.tasks
    );
    assert_eq!(
        running(&status, pb::TaskState::Pending),
        1,
        "{:?}",
        status.tasks
    );
    assert_eq!(status.spec.as_ref().unwrap().max_workers, 1);
    let done = wait_succeeded(&cluster, &id).await;
    assert_eq!(running(&done, pb::TaskState::Succeeded), 2);
    // refused with exact mode, naming the field
    let (ok, _, err) = cluster.cli(&[
        "submit",
        "--content",
        &path("tubingen.jpg"),
        "--style",
        &path("starry_night.jpg"),
        "--tiled",
        "--exact",
        "--max-workers",
        "2",
    ]);
    assert!(
        !ok && err.contains("max_workers: not with exact mode"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_runs_on_two_workers_and_a_sweep_gets_its_contact_sheet() {
    let mut cluster = Cluster::start(10.0, 0.5);
    cluster.add_worker("w1");
    cluster.add_worker("w2");
    wait_registered(&cluster, 2).await;
    let out = cluster.dir.path().join("batch");
    let (content_a, content_b, style_a, style_b) = (
        path("tubingen.jpg"),
        path("chelsea.png"),
        path("starry_night.jpg"),
        path("the_scream.jpg"),
    );
    let (ok, stdout, err) = cluster.cli(&[
        "submit",
        "--content",
        &content_a,
        "--content",
        &content_b,
        "--style",
        &style_a,
        "--style",
        &style_b,
        "--batch",
        "--size",
        "48",
        "--iterations",
        "15",
        "--wait",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let mut client = cluster.client().await;
    let status = job(&mut client, stdout.trim()).await;
    assert!(is(&status, pb::JobState::Succeeded));
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        4,
        "2 contents x 2 styles"
    );
    let workers: HashSet<&str> = status.tasks.iter().map(|t| t.worker_id.as_str()).collect();
    assert_eq!(workers.len(), 2, "both workers rendered: {workers:?}");

    let sweep = cluster.dir.path().join("sweep");
    let (ok, stdout, err) = cluster.cli(&[
        "submit",
        "--content",
        &content_a,
        "--style",
        &style_a,
        "--sweep",
        "style_weight=10,1000;optimizer=lbfgs,adam;pooling=avg;style_layers=relu1_1:relu3_1",
        "--size",
        "32",
        "--iterations",
        "5",
        "--wait",
        "-o",
        sweep.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let status = job(&mut client, stdout.trim()).await;
    let labels: Vec<&str> = status.tasks.iter().map(|t| t.label.as_str()).collect();
    assert_eq!(
        labels[3], "style_weight=1000 optimizer=adam pooling=avg style_layers=relu1_1:relu3_1",
        "{labels:?}"
    );
    let sheet = image::open(sweep.join("contact-sheet.png")).unwrap();
    assert!(sheet.width() > 2 * 32 && sheet.height() > 2 * 32);
    assert_eq!(
        std::fs::read_dir(&sweep).unwrap().count(),
        5,
        "4 points and the sheet"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_task_is_replaced_and_the_pixels_are_the_same() {
    let mut cluster = Cluster::start(1.5, 0.3);
    cluster.add_worker("doomed");
    wait_registered(&cluster, 1).await;
    let common = [
        "--content",
        &path("tubingen.jpg"),
        "--style",
        &path("starry_night.jpg"),
        "--size",
        "64",
        "--iterations",
        "60",
        "--init",
        "noise",
        "--seed",
        "3",
    ];
    let first = submit(
        &cluster,
        &[&common[..], &["--request-id", "disturbed"]].concat(),
    );
    wait_iteration(&cluster, &first, 5).await;
    // a watch says why the task runs again
    let watch = stylefarm_tests::stylefarm()
        .args(["watch", &first])
        .env("STYLEFARM_COORDINATOR", &cluster.url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    cluster.workers[0].kill();
    cluster.add_worker("survivor");
    let disturbed = wait_succeeded(&cluster, &first).await;
    assert_eq!(
        disturbed.tasks[0].attempts, 2,
        "the lost attempt and the one that finished"
    );
    assert!(disturbed.tasks[0].worker_id.starts_with("survivor"));
    let watched = watch.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&watched.stderr);
    assert!(
        err.contains("task 0 (render) running again, attempt 2: lease expired (worker lost)"),
        "{err}"
    );

    let second = submit(
        &cluster,
        &[&common[..], &["--request-id", "undisturbed"]].concat(),
    );
    let undisturbed = wait_succeeded(&cluster, &second).await;
    assert_eq!(
        disturbed.tasks[0].result, undisturbed.tasks[0].result,
        "same spec, same pixels (sha256)"
    );
}

/// A worker sent SIGTERM mid-task finishes it, takes no other and exits 0; meanwhile its heartbeats say it
/// is leaving: `workers` lists it so (not busy: nothing more is planned for it), and the metrics count it
/// leaving, not live.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_sent_sigterm_finishes_its_task_takes_no_other_and_exits() {
    let mut cluster = Cluster::new(10.0, 0.3, "embedded");
    cluster.coordinator_args = vec!["--metrics-listen".into(), "127.0.0.1:0".into()];
    cluster.start_coordinator();
    let metrics = metrics_addr(cluster.coordinator.as_ref().unwrap()).await;
    cluster.add_worker("draining");
    wait_registered(&cluster, 1).await;
    let (content, style) = (path("tubingen.jpg"), path("starry_night.jpg"));
    let common = [
        "--content",
        &content,
        "--style",
        &style,
        "--size",
        "64",
        // long enough to be running still when `workers` is asked (about 6 s)
        "--iterations",
        "80",
    ];
    let running = submit(
        &cluster,
        &[&common[..], &["--request-id", "running"]].concat(),
    );
    wait_iteration(&cluster, &running, 3).await;
    // a beat saying it is leaving for no lease of its, from a caller that knows the worker's id: no mark
    let mut rpc = pb::worker_service_client::WorkerServiceClient::connect(cluster.url.clone())
        .await
        .unwrap();
    let beat = pb::HeartbeatRequest {
        worker_id: "draining#1".into(),
        leaving: true,
        ..Default::default()
    };
    rpc.heartbeat(beat).await.unwrap();
    let (_, out, _) = cluster.cli(&["workers"]);
    assert!(out.starts_with("draining#1\tbusy\t"), "{out}");
    let queued = submit(
        &cluster,
        &[&common[..], &["--request-id", "queued"]].concat(),
    );
    cluster.workers[0].terminate();
    wait_for("workers to list it leaving", Duration::from_secs(5), || {
        let (_, out, _) = cluster.cli(&["workers"]);
        async move { out.starts_with("draining#1\tleaving\t").then_some(()) }
    })
    .await;
    let scraped = scrape(&metrics).await;
    let workers =
        |state: &str| metric_value(&scraped, &format!("stylefarm_workers{{state=\"{state}\"}}"));
    assert_eq!(
        (workers("live"), workers("leaving"), workers("drained")),
        (Some(0.0), Some(1.0), Some(0.0)),
        "{scraped}"
    );
    let done = wait_succeeded(&cluster, &running).await;
    assert_eq!(done.tasks[0].attempts, 1, "finished, not abandoned");
    let worker = &mut cluster.workers[0];
    let exit = wait_for("the worker to exit", Duration::from_secs(30), || {
        let status = worker.child.try_wait().unwrap();
        async move { status }
    })
    .await;
    assert!(exit.success(), "{exit:?}");
    let mut client = cluster.client().await;
    let other = job(&mut client, &queued).await;
    assert!(
        is(&other, pb::JobState::Queued),
        "no new task taken: {other:?}"
    );
}

/// A worker the coordinator refuses to register (an empty name), or whose coordinator address is
/// malformed, leaves at once with exit code 1 naming why, instead of registering again every second for
/// ever, or exiting 0 where a supervisor that restarts failed processes would do nothing.
#[test]
fn a_worker_that_cannot_register_leaves_with_an_error() {
    let cluster = Cluster::start(10.0, 0.5);
    for (coordinator, name, needle) in [
        (cluster.url.as_str(), "", "name: 1 to"),
        ("http://exa mple:7700", "w", "a bad url or TLS options"),
    ] {
        let mut worker = stylefarm_tests::stylefarm()
            .args(["worker", "--coordinator", coordinator, "--device", "cpu"])
            .args(["--name", name])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let status = stylefarm_tests::wait_exit(
            &mut worker,
            Duration::from_secs(60),
            "the worker did not leave",
        );
        let mut err = String::new();
        std::io::Read::read_to_string(&mut worker.stderr.take().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(1), "{err}");
        assert!(err.contains(needle), "{needle}: {err}");
    }
}

/// An idle worker sent SIGTERM while it waits for a task (a 10-s long poll) leaves at once, its wait
/// dropped, rather than once the wait is over, when a task that came meanwhile would be started. It signs
/// off: listed and counted as left.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_worker_sent_sigterm_leaves_without_waiting_for_a_task() {
    let mut cluster = Cluster::new(10.0, 0.3, "embedded");
    cluster.coordinator_args = vec!["--metrics-listen".into(), "127.0.0.1:0".into()];
    cluster.start_coordinator();
    let metrics = metrics_addr(cluster.coordinator.as_ref().unwrap()).await;
    cluster.add_worker("idle");
    wait_registered(&cluster, 1).await;
    // in its long poll
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.workers[0].terminate();
    let sent = Instant::now();
    let worker = &mut cluster.workers[0];
    let exit = wait_for("the worker to exit", Duration::from_secs(30), || {
        let status = worker.child.try_wait().unwrap();
        async move { status }
    })
    .await;
    assert!(exit.success(), "{exit:?}");
    assert!(
        sent.elapsed() < Duration::from_secs(4),
        "left {:?} after SIGTERM",
        sent.elapsed()
    );
    // it signed off: listed as left, not idle for the minute the coordinator would take to notice
    let (ok, out, err) = cluster.cli(&["workers"]);
    assert!(ok && out.contains("idle#1\tleft\t"), "{out} {err}");
    let scraped = scrape(&metrics).await;
    let workers =
        |state: &str| metric_value(&scraped, &format!("stylefarm_workers{{state=\"{state}\"}}"));
    assert_eq!(
        (workers("live"), workers("silent"), workers("left")),
        (Some(0.0), Some(0.0), Some(1.0)),
        "{scraped}"
    );
}

/// A worker sent SIGTERM mid-task finishes it: it is still there a second later; a second SIGTERM stops it
/// at once, exit 143 (128 + SIGTERM) saying so, and signs off: its task goes back to the queue at once,
/// not when its lease lapses.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_interrupted_twice_leaves_its_task_unfinished() {
    // a lease (60 s) far longer than the wait for the task to come back: its worker gave it up
    let mut cluster = Cluster::start(60.0, 0.3);
    cluster.add_worker("w");
    // 256 px: iterations long enough that a task in its first ones is far from done
    let job_id = submit(&cluster, &x_starry("chelsea.png", 256, 5000));
    wait_iteration(&cluster, &job_id, 1).await;
    let worker = &mut cluster.workers[0];
    worker.terminate();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        worker.child.try_wait().unwrap().is_none(),
        "left at the first SIGTERM: {}",
        worker.log_text()
    );
    worker.terminate();
    let sent = Instant::now();
    let exit = stylefarm_tests::wait_exit(
        &mut worker.child,
        Duration::from_secs(30),
        "the worker did not exit at a second SIGTERM",
    );
    let log = worker.log_text();
    assert_eq!(exit.code(), Some(143), "{exit:?}: {log}");
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "left {:?} after the second SIGTERM: {log}",
        sent.elapsed()
    );
    assert!(
        log.contains("interrupted again: left without finishing the task at hand"),
        "{log}"
    );
    // it signed off: its task is queued again at once, not when its lease lapses
    let client = cluster.client().await;
    let task = wait_for("the task queued again", Duration::from_secs(10), || {
        let (mut client, job_id) = (client.clone(), &job_id);
        async move {
            let tasks = job(&mut client, job_id).await.tasks;
            (tasks[0].state == pb::TaskState::Pending as i32).then(|| tasks[0].clone())
        }
    })
    .await;
    assert!(task.error.contains("signed off"), "{task:?}");
    let (ok, out, err) = cluster.cli(&["workers"]);
    assert!(ok && out.contains("w#1\tleft\t"), "{out} {err}");
}

/// `submit --wait` interrupted (SIGTERM, as Ctrl-C) once its job is submitted leaves the job running and
/// says how to follow or stop it.
#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_submit_wait_leaves_its_job_running_and_says_so() {
    use std::io::BufRead;
    let cluster = Cluster::start(10.0, 0.3);
    let out = tempfile::tempdir().unwrap();
    let mut submit = stylefarm_tests::stylefarm()
        .arg("submit")
        .args(tubingen_x_starry(32, 2))
        .arg("--wait")
        .arg("-o")
        .arg(out.path())
        .env("STYLEFARM_COORDINATOR", &cluster.url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut job_id = String::new();
    std::io::BufReader::new(submit.stdout.take().unwrap())
        .read_line(&mut job_id)
        .unwrap();
    let job_id = job_id.trim().to_string();
    // its wait started (no worker: the job waits)
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &submit.id().to_string()])
        .status();
    let exit = stylefarm_tests::wait_exit(
        &mut submit,
        Duration::from_secs(30),
        "submit --wait did not stop at SIGTERM",
    );
    let mut err = String::new();
    std::io::Read::read_to_string(&mut submit.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(exit.code(), Some(143), "{exit:?}: {err}");
    assert!(
        err.contains(&format!(
            "interrupted: the job goes on; `stylefarm watch {job_id}` follows it"
        )) && err.contains(&format!(
            "`stylefarm fetch {job_id} -o {}` writes its results",
            out.path().display()
        )),
        "{err}"
    );
    let mut client = cluster.client().await;
    assert!(is(&job(&mut client, &job_id).await, pb::JobState::Queued));
}

/// A coordinator stopped (SIGTERM, as Ctrl-C stops it) while a client watches a job and a worker waits for
/// a task (in a 10-s lease poll) ends both calls at once and exits, not waiting on them: the watch ends
/// UNAVAILABLE, saying why (a client then watches again), and the coordinator's store is released, so
/// that one started again on it serves the job.
#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_stopped_while_a_job_is_watched_exits_at_once() {
    use tokio_stream::StreamExt;
    let mut cluster = Cluster::start(10.0, 0.3);
    cluster.add_worker("idle");
    wait_registered(&cluster, 1).await;
    // a job for a tag the worker lacks: watched while it waits, the worker in its lease poll meanwhile
    let args = [
        tubingen_x_starry(32, 2),
        vec!["--worker-tag".into(), "gpu".into()],
    ]
    .concat();
    let job_id = submit(&cluster, &args);
    let mut client = cluster.client().await;
    let mut events = client
        .watch_events(&job_id.as_str().into(), false)
        .await
        .unwrap();
    assert!(events.next().await.unwrap().is_ok());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let coordinator = cluster.coordinator.as_mut().unwrap();
    coordinator.terminate();
    let sent = Instant::now();
    let exit = stylefarm_tests::wait_exit(
        &mut coordinator.child,
        Duration::from_secs(30),
        "the coordinator did not exit after SIGTERM",
    );
    let log = coordinator.log_text();
    assert!(exit.success(), "{exit:?}: {log}");
    // neither the watch nor the poll held it (each would, for good or for its 10 s)
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "exited {:?} after SIGTERM: {log}",
        sent.elapsed()
    );
    let ended = loop {
        match events.next().await {
            Some(Ok(_)) => continue,
            other => break other,
        }
    };
    match ended {
        Some(Err(e)) => assert!(
            e.is_connection_lost() && e.to_string().contains("the coordinator is stopping"),
            "{e}"
        ),
        other => panic!("the watch ended with {other:?}"),
    }
    cluster.start_coordinator();
    let mut client = cluster.client().await;
    assert!(is(&job(&mut client, &job_id).await, pb::JobState::Queued));
}

/// Paused jobs wait, saying so, while a worker is free: nothing of them is leased (a priority changed
/// meanwhile; one submitted paused); resumed, they render. The commands take several jobs at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_paused_job_waits_for_its_resume_while_a_worker_is_free() {
    let mut cluster = Cluster::start(10.0, 0.3);
    let id = submit(&cluster, &tubingen_x_starry(32, 2));
    // a job submitted paused; then both paused in one command (the other already is), a line each
    let other = submit(
        &cluster,
        &[x_starry("chelsea.png", 32, 2), vec!["--paused".into()]].concat(),
    );
    let mut client = cluster.client().await;
    assert!(job(&mut client, &other).await.paused);
    let (ok, out, err) = cluster.cli(&["pause", &id, &other]);
    assert!(
        ok && out.matches("queued\tpaused").count() == 2,
        "{out} {err}"
    );
    cluster.add_worker("w1");
    wait_registered(&cluster, 1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let paused = job(&mut client, &id).await;
    assert!(
        paused.paused && is(&paused, pb::JobState::Queued),
        "{paused:?}"
    );
    assert_eq!(paused.tasks[0].attempts, 0, "nothing leased while paused");
    let (ok, out, _) = cluster.cli(&["status", &id]);
    assert!(ok && out.contains("waiting: paused"), "{out}");
    // its priority changed meanwhile (a negative one parses as a number)
    for priority in ["-3", "5"] {
        let (ok, out, err) = cluster.cli(&["priority", &id, priority]);
        assert!(
            ok && out.ends_with(&format!("priority {priority}\n")),
            "{out} {err}"
        );
    }
    let spec = job(&mut client, &id).await.spec.unwrap();
    assert_eq!(spec.priority, 5);
    let (ok, out, _) = cluster.cli(&["status", &id]);
    assert!(ok && out.lines().nth(1) == Some("  priority 5"), "{out}");
    let (ok, out, err) = cluster.cli(&["resume", &id, &other]);
    assert!(ok && out.matches("resumed").count() == 2, "{out} {err}");
    for job_id in [&id, &other] {
        let done = wait_state(
            &cluster,
            job_id,
            pb::JobState::Succeeded,
            Duration::from_secs(60),
        )
        .await;
        assert!(!done.paused && done.tasks[0].attempts == 1, "{done:?}");
    }
    // one unknown job among several: the others are done, the command fails saying how many did not
    let (ok, out, err) = cluster.cli(&["cancel", &id, "job-unknown", &other]);
    assert!(
        !ok && out.matches("succeeded\tfinished: left as it is").count() == 2,
        "{out}"
    );
    assert!(
        err.contains("job-unknown: job job-unknown not found")
            && err.contains("the command failed for 1 of the 3 jobs given (each said above)"),
        "{err}"
    );
    // nor does a finished job's priority change
    let (ok, out, err) = cluster.cli(&["priority", &id, "9"]);
    assert!(
        ok && out.ends_with("succeeded\tfinished: left as it is\n"),
        "{out} {err}"
    );
}

/// Two passes chained as jcjohnson/neural-style's multi-resolution scripts chain runs: a coarse render,
/// then a larger one with another style weight that starts from its result (`--init job:ID`), and a job
/// after the second (`--after`). Each waits, saying so, until the one before has succeeded (not for a
/// worker), and the second's spec then names the first's result as its init. A job after one that is
/// cancelled fails, naming it; a new job after that one, or after a bad id, is refused naming `after`.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_starts_from_the_result_of_the_job_it_is_after() {
    let mut cluster = Cluster::start(10.0, 0.3);
    let first = submit(&cluster, &tubingen_x_starry(32, 3));
    let second = submit(
        &cluster,
        &[
            tubingen_x_starry(64, 2),
            vec![
                "--init".into(),
                format!("job:{first}"),
                "--style-weight".into(),
                "1000".into(),
            ],
        ]
        .concat(),
    );
    let after_second = [
        x_starry("chelsea.png", 32, 2),
        vec!["--after".into(), second.clone()],
    ]
    .concat();
    let third = submit(&cluster, &after_second);
    let mut client = cluster.client().await;
    assert_eq!(job(&mut client, &second).await.waiting_on, [first.as_str()]);
    assert_eq!(job(&mut client, &third).await.waiting_on, [second.as_str()]);
    let (ok, out, _) = cluster.cli(&["status", &second]);
    assert!(
        ok && out.contains(&format!("waiting: waiting for job {first} to succeed")),
        "{out}"
    );
    cluster.add_worker("w1");
    let done = wait_state(
        &cluster,
        &first,
        pb::JobState::Succeeded,
        Duration::from_secs(60),
    )
    .await;
    let result = &done.tasks[0].result;
    let second_done = wait_state(
        &cluster,
        &second,
        pb::JobState::Succeeded,
        Duration::from_secs(60),
    )
    .await;
    let init = second_done.spec.unwrap().params.unwrap().init;
    assert_eq!(init, Some(format!("image:{result}")));
    assert!(second_done.waiting_on.is_empty());
    wait_state(
        &cluster,
        &third,
        pb::JobState::Succeeded,
        Duration::from_secs(60),
    )
    .await;

    let paused = submit(
        &cluster,
        &[tubingen_x_starry(32, 2), vec!["--paused".into()]].concat(),
    );
    let after_paused = [
        x_starry("chelsea.png", 32, 2),
        vec!["--after".into(), paused.clone()],
    ]
    .concat();
    let orphan = submit(&cluster, &after_paused);
    let (ok, _, err) = cluster.cli(&["cancel", &paused]);
    assert!(ok, "{err}");
    let failed = wait_state(
        &cluster,
        &orphan,
        pb::JobState::Failed,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        failed.error,
        format!("after: job {paused}, which it waits for, was cancelled")
    );
    let refused = |args: &[String]| {
        let args: Vec<&str> = std::iter::once("submit")
            .chain(args.iter().map(String::as_str))
            .collect();
        let (ok, _, err) = cluster.cli(&args);
        assert!(!ok);
        err
    };
    let err = refused(&after_paused);
    assert!(
        err.contains(&format!("after: job {paused} was cancelled")),
        "{err}"
    );
    let err = refused(
        &[
            x_starry("chelsea.png", 32, 2),
            vec!["--after".into(), "job 1".into()],
        ]
        .concat(),
    );
    assert!(err.contains("'job 1' is no job id"), "{err}");
    // `local` starts an empty farm: nothing to wait for, refused before it starts
    for (flag, value, field) in [
        ("--after", "job-1", "after"),
        ("--init", "job:job-1", "init"),
    ] {
        let out = stylefarm_tests::stylefarm()
            .args(["local", "--content", &path("tubingen.jpg")])
            .args([
                "--style",
                &path("starry_night.jpg"),
                "-o",
                "unused.png",
                flag,
                value,
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(&format!("{field}: a local farm")),
            "{err}"
        );
    }
}

/// A cancel stops the running worker within a heartbeat, and it takes the next job; the cancelled task keeps
/// its last checkpoint (`--checkpoint-secs 1`: saved by time, by a real worker), for a retry.
#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_the_running_worker_within_a_heartbeat() {
    let heartbeat = 0.3;
    let mut cluster = Cluster::start(10.0, heartbeat);
    cluster.add_worker("w1");
    wait_registered(&cluster, 1).await;
    let long = submit(
        &cluster,
        &[
            "--content",
            &path("tubingen.jpg"),
            "--style",
            &path("starry_night.jpg"),
            "--size",
            "64",
            "--iterations",
            "5000",
            "--checkpoint-secs",
            "1",
        ],
    );
    wait_iteration(&cluster, &long, 2).await;
    // its checkpoints come by time: the first a second after its first iteration
    wait_job(
        &cluster.client().await,
        &long,
        "the long job's first checkpoint",
        Duration::from_secs(30),
        |s| s.tasks[0].checkpoint.is_some(),
    )
    .await;
    // queued behind the long job: the only worker can take it only once it has stopped the cancelled one
    let next = submit(
        &cluster,
        &[
            "--content",
            &path("tubingen.jpg"),
            "--style",
            &path("starry_night.jpg"),
            "--size",
            "32",
            "--iterations",
            "3",
        ],
    );
    let mut client = cluster.client().await;
    assert_eq!(
        job(&mut client, &next).await.tasks[0].attempts,
        0,
        "the worker is busy with the long job"
    );
    let cancelled_at = Instant::now();
    let reply = client
        .rpc()
        .cancel_job(pb::CancelJobRequest {
            job_id: long.clone(),
            tasks: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.state, pb::JobState::Cancelled as i32);
    wait_job(
        &client,
        &next,
        "the worker to take the next job",
        Duration::from_secs(30),
        |s| s.tasks[0].attempts > 0,
    )
    .await;
    let stopped_after = cancelled_at.elapsed();
    // one heartbeat to learn of it, one iteration to stop, a lease call, plus slack for a loaded machine
    assert!(
        stopped_after < Duration::from_secs_f64(heartbeat + 2.0),
        "stopped after {stopped_after:?}"
    );
    eprintln!("the worker stopped and took the next job {stopped_after:?} after the cancel");
    assert!(cluster.workers[0]
        .log_text()
        .contains("cancelled by the coordinator"));
    let mut client = cluster.client().await;
    let cancelled = job(&mut client, &long).await;
    assert!(is(&cancelled, pb::JobState::Cancelled));
    assert!(
        cancelled.tasks[0].checkpoint.is_some(),
        "a cancelled task keeps its checkpoint, for a retry"
    );
    let (ok, out, err) = cluster.cli(&["cancel", &long]);
    assert!(
        ok && out.contains("cancelled"),
        "cancelling again keeps the state: {out} {err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_killed_and_restarted_loses_nothing() {
    // a lease of 10 s: the restart, however slow the machine, comes well within it
    killed_and_restarted(Cluster::start(10.0, 0.3), true).await;
}

/// The blobs of a coordinator's disk blob store (`<data dir>/blobs/<2 hex digits>/<sha256>`), by sha256.
fn blobs_on_disk(cluster: &Cluster) -> HashSet<String> {
    let dir = cluster.data_dir.join("blobs");
    let mut hashes = HashSet::new();
    for shard in std::fs::read_dir(&dir).unwrap().map(Result::unwrap) {
        if shard.file_name() != "tmp" {
            for blob in std::fs::read_dir(shard.path()).unwrap().map(Result::unwrap) {
                hashes.insert(blob.file_name().into_string().unwrap());
            }
        }
    }
    hashes
}

/// The images a finished job refers to: its inputs, its tasks' results, its contact sheet.
fn job_images(status: &pb::JobStatus) -> HashSet<String> {
    let spec = status.spec.as_ref().unwrap();
    let results = status.tasks.iter().map(|t| &t.result);
    spec.contents
        .iter()
        .chain(&spec.styles)
        .chain(results)
        .chain(Some(&status.contact_sheet))
        .filter(|h| !h.is_empty())
        .cloned()
        .collect()
}

/// A coordinator started with `--keep-unused-blobs-secs 2` deletes the images that no job refers to: an
/// upload never submitted, then a deleted job's content and result, while the images of a sweep it holds
/// (one style shared with the deleted job) stay and are fetched whole; the deleted job's content can be
/// submitted again.
#[tokio::test(flavor = "multi_thread")]
async fn images_that_no_job_refers_to_are_collected() {
    let mut cluster = Cluster::new(3.0, 0.3, "embedded");
    cluster.coordinator_args = vec!["--keep-unused-blobs-secs".into(), "2".into()];
    cluster.start_coordinator();
    cluster.add_worker("w1");
    wait_registered(&cluster, 1).await;
    let mut sweep = tubingen_x_starry(48, 2);
    sweep.extend(["--sweep".into(), "style_weight=10,1000".into()]);
    let kept = submit(&cluster, &sweep);
    let chelsea = x_starry("chelsea.png", 48, 2);
    let deleted = submit(&cluster, &chelsea);
    let mut client = cluster.client().await;
    let scream = std::fs::read(shared_image("the_scream.jpg")).unwrap();
    let unsubmitted = client.upload(&scream, "the_scream.jpg").await.unwrap();
    let mut held = HashSet::new();
    for id in [&kept, &deleted] {
        let status = wait_succeeded(&cluster, id).await;
        held.extend(job_images(&status));
    }
    let kept_images = job_images(&job(&mut client, &kept).await);
    assert_eq!(
        kept_images.len(),
        5,
        "content, style, 2 results, contact sheet"
    );
    let blobs = cluster.data_dir.clone();
    let gone = |hash: String| {
        let blob = blobs.join("blobs").join(&hash[..2]).join(hash);
        move || {
            let deleted = !blob.exists();
            async move { deleted.then_some(()) }
        }
    };
    wait_for(
        "the upload no job refers to to be deleted",
        Duration::from_secs(30),
        gone(unsubmitted.to_string()),
    )
    .await;
    assert_eq!(
        blobs_on_disk(&cluster),
        held,
        "the images of the jobs held stay"
    );
    client.delete(&deleted.clone().into()).await.unwrap();
    let content = std::fs::read(shared_image("chelsea.png")).unwrap();
    let content = stylefarm_core::ids::ImageHash::of(&content).to_string();
    wait_for(
        "the deleted job's content to be deleted",
        Duration::from_secs(30),
        gone(content),
    )
    .await;
    // its result, written later, may take another collection
    wait_for(
        "only the sweep's images to be left",
        Duration::from_secs(30),
        || {
            let left = blobs_on_disk(&cluster) == kept_images;
            async move { left.then_some(()) }
        },
    )
    .await;
    cluster
        .coordinator
        .as_ref()
        .unwrap()
        .wait_logged("unused blobs deleted", Duration::from_secs(1))
        .await;
    let out = tempfile::tempdir().unwrap();
    let (ok, _, err) = cluster.cli(&["fetch", &kept, "-o", out.path().to_str().unwrap()]);
    assert!(ok, "{err}");
    // uploaded again, as the images of any new job
    let again = submit(&cluster, &chelsea);
    wait_succeeded(&cluster, &again).await;
}

/// A coordinator started with `--keep-finished-secs 2` deletes a finished job by itself (while an unfinished
/// one stays), and the deletion is in its store: restarted, it does not have the job back.
#[tokio::test(flavor = "multi_thread")]
async fn finished_jobs_past_the_keep_time_are_deleted_by_the_coordinator() {
    let mut cluster = Cluster::new(3.0, 0.3, "embedded");
    cluster.coordinator_args = vec!["--keep-finished-secs".into(), "2".into()];
    cluster.start_coordinator();
    cluster.add_worker("w1");
    wait_registered(&cluster, 1).await;
    let done = submit(&cluster, &tubingen_x_starry(48, 5));
    let finished = wait_state(
        &cluster,
        &done,
        pb::JobState::Succeeded,
        Duration::from_secs(60),
    )
    .await
    .finished_ms;
    // no worker for this one: stopped first, the job stays queued
    cluster.workers[0].kill();
    let queued = submit(&cluster, &tubingen_x_starry(48, 5));
    let mut client = cluster.client().await;
    wait_for(
        "the finished job to be deleted",
        Duration::from_secs(20),
        || {
            let mut client = client.clone();
            let id = done.clone();
            async move {
                match client.job(&id.into()).await {
                    Err(stylefarm_client::ClientError::Status(s)) if s.code() == Code::NotFound => {
                        Some(())
                    }
                    _ => None,
                }
            }
        },
    )
    .await;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!(now_ms - finished >= 2000, "kept 2 s first");
    // logged once the deletion is stored, a moment after the job left the scheduler
    let coordinator = cluster.coordinator.as_ref().unwrap();
    coordinator
        .wait_logged(
            "finished jobs past their keep time deleted",
            Duration::from_secs(10),
        )
        .await;
    assert!(is(&job(&mut client, &queued).await, pb::JobState::Queued));
    cluster.coordinator.as_mut().unwrap().kill();
    cluster.start_coordinator();
    let mut client = cluster.client().await;
    let listed: Vec<_> = client
        .list(&[], 100)
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.job_id)
        .collect();
    assert_eq!(listed, [queued], "the deletion was stored");
}

/// The same on a Redis server: the jobs and tasks are there, not in the data dir, and a new coordinator
/// process on that server carries the job on.
#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_on_redis_killed_and_restarted_loses_nothing() {
    let redis = RedisServer::start();
    let cluster = Cluster::start_on_store(3.0, 0.3, &redis.url());
    let data_dir = cluster.data_dir.clone();
    killed_and_restarted(cluster, false).await;
    assert!(
        !data_dir.join("state.redb").exists(),
        "the jobs were in Redis"
    );
}

/// The same with the images in an S3-compatible store as well (a real server, s3s-fs): nothing of the job
/// is in the data dir, and the results are objects of the bucket. The restarted coordinator's
/// `stylefarm_blob_store_bytes` counts the objects stored before it started (a listing at start-up).
#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_on_redis_and_s3_killed_and_restarted_loses_nothing() {
    let redis = RedisServer::start();
    let s3 = S3Server::start();
    let mut cluster = Cluster::start(3.0, 0.3);
    cluster.coordinator.as_mut().unwrap().kill();
    std::fs::remove_dir_all(&cluster.data_dir).unwrap();
    cluster.store = redis.url();
    cluster.coordinator_args = [
        "--blobs",
        "s3://farm/images",
        "--metrics-listen",
        "127.0.0.1:0",
    ]
    .map(String::from)
    .to_vec();
    cluster.coordinator_env = s3.env();
    cluster.start_coordinator();
    let data_dir = cluster.data_dir.clone();
    let cluster = killed_and_restarted(cluster, false).await;
    assert!(
        !data_dir.join("state.redb").exists() && !data_dir.join("blobs").exists(),
        "the jobs were in Redis, the images in S3"
    );
    let objects = std::fs::read_dir(s3.bucket_dir().join("images"))
        .unwrap()
        .count();
    assert!(
        objects >= 5,
        "3 inputs and 2 results in the bucket: {objects}"
    );
    // the largest object is an input, stored before the restart
    let largest = std::fs::read_dir(s3.bucket_dir().join("images"))
        .unwrap()
        .map(|f| f.unwrap().metadata().unwrap().len())
        .max()
        .unwrap();
    let metrics = metrics_addr(cluster.coordinator.as_ref().unwrap()).await;
    wait_for(
        "the blob store's bytes to count those stored before",
        Duration::from_secs(10),
        || {
            let metrics = metrics.clone();
            async move {
                let bytes = metric_value(&scrape(&metrics).await, "stylefarm_blob_store_bytes");
                bytes.filter(|&b| b >= largest as f64)
            }
        },
    )
    .await;
}

/// A server at a coordinator's URL that is not one (here the coordinator's own status page, an HTTP server
/// that speaks HTTP/2 too: the port a user may mix up with `--listen`) does not answer gRPC's health check:
/// alone, the CLI says it is not a coordinator; first in a list, it is passed over for the next URL.
/// Before, its HTTP answer (a 404) was taken for a live coordinator's, and every call failed on it. An
/// empty farm's `list` and `workers` print nothing, and say so on stderr.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_is_not_a_coordinator_is_passed_over() {
    let mut cluster = Cluster::new(10.0, 0.3, "embedded");
    cluster.coordinator_args = vec!["--status-listen".into(), "127.0.0.1:0".into()];
    cluster.start_coordinator();
    let page =
        stylefarm_tests::logged_addr(cluster.coordinator.as_ref().unwrap(), "status page").await;
    let page = format!("http://{page}");
    let (ok, _, err) = cluster.cli(&["list", "--coordinator", &page]);
    let said = format!("the coordinator at {page} does not answer: not a stylefarm coordinator");
    assert!(!ok && err.contains(&said), "{err}");
    let both = format!("{page},{}", cluster.url);
    let (ok, out, err) = cluster.cli(&["list", "--coordinator", &both]);
    // an empty farm: nothing on stdout (for a script), and why on stderr
    assert!(
        ok && out.is_empty() && err.contains("(no jobs"),
        "{out} {err}"
    );
    let (ok, out, err) = cluster.cli(&["workers"]);
    assert!(
        ok && out.is_empty() && err.contains("(no workers"),
        "{out} {err}"
    );
}

/// Two coordinators on one Redis server: the second waits as a standby (it listens only once active; one
/// given an address it cannot bind exits at once). The active one is SIGKILLed mid-job; the standby serves within two leader-lease periods, the worker (given
/// both addresses) carries on with it, and the job completes with every result.
#[tokio::test(flavor = "multi_thread")]
async fn a_standby_coordinator_takes_over_when_the_active_one_is_killed() {
    standby_takes_over(false).await;
}

/// The same with the active coordinator frozen (SIGSTOP, as a host that hangs or drops off the network:
/// its connections stay open, its kernel still accepts new ones) while the worker waits for a task. The
/// worker notices that the coordinator no longer answers (its long poll unanswered past its wait), passes
/// over the frozen one, whose health check goes unanswered, and takes tasks from the standby; the CLI,
/// given both addresses, reaches the standby too, and a job submitted after the freeze completes. Before,
/// the worker waited on the frozen coordinator for ever.
#[tokio::test(flavor = "multi_thread")]
async fn a_standby_coordinator_takes_over_when_the_active_one_freezes() {
    standby_takes_over(true).await;
}

/// Two coordinators on one Redis, the active one taken away: SIGKILLed mid-job, or frozen (SIGSTOP) with
/// the worker idle ([`a_standby_coordinator_takes_over_when_the_active_one_freezes`]).
async fn standby_takes_over(frozen: bool) {
    const LEASE_SECS: f64 = 2.0;
    let redis = RedisServer::start();
    let mut cluster = Cluster::start(3.0, 0.3);
    cluster.store = redis.url();
    cluster.coordinator_args = vec!["--leader-lease-secs".into(), LEASE_SECS.to_string()];
    // the first coordinator again, now on Redis: the active one
    cluster.coordinator.as_mut().unwrap().kill();
    cluster.start_coordinator();
    let active = cluster.url.clone();
    let standby_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap();
    let standby_log = cluster.dir.path().join("standby.log");
    let mut standby = stylefarm_tests::stylefarm()
        .args([
            "coordinator",
            "--listen",
            &standby_addr.to_string(),
            "--data-dir",
        ])
        .arg(&cluster.data_dir)
        .args([
            "--lease-secs",
            "3",
            "--heartbeat-secs",
            "0.3",
            "--store",
            &redis.url(),
        ])
        .args(&cluster.coordinator_args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&standby_log).unwrap())
        .spawn()
        .unwrap();
    let standby_out = standby.stdout.take().unwrap();
    let _standby = stylefarm_tests::Node {
        child: standby,
        log: standby_log,
    };
    let (listening_tx, listening) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(standby_out), &mut line);
        let _ = listening_tx.send((Instant::now(), line));
    });
    // another standby, told to stop (its pod deleted): it exits at once, not at the end of its wait
    let mut second = stylefarm_tests::Node {
        child: stylefarm_tests::stylefarm()
            .args(["coordinator", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(cluster.dir.path().join("second"))
            .args(["--store", &redis.url()])
            .args(&cluster.coordinator_args)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(cluster.dir.path().join("second.log")).unwrap())
            .spawn()
            .unwrap(),
        log: cluster.dir.path().join("second.log"),
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(second.child.try_wait().unwrap().is_none(), "standing by");
    second.terminate();
    let stopped = stylefarm_tests::wait_exit(
        &mut second.child,
        Duration::from_secs(5),
        "a standby told to stop exits",
    );
    assert!(stopped.success(), "{}", second.log_text());
    // a standby given an address it cannot bind (the active one's) says so at once, not at its takeover
    let taken = active.trim_start_matches("http://");
    let mut third = stylefarm_tests::Node {
        child: stylefarm_tests::stylefarm()
            .args(["coordinator", "--listen", taken, "--data-dir"])
            .arg(cluster.dir.path().join("third"))
            .args(["--store", &redis.url()])
            .args(&cluster.coordinator_args)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(cluster.dir.path().join("third.log")).unwrap())
            .spawn()
            .unwrap(),
        log: cluster.dir.path().join("third.log"),
    };
    let exit = stylefarm_tests::wait_exit(
        &mut third.child,
        Duration::from_secs(10),
        "a standby that cannot bind its address exits",
    );
    let err = third.log_text();
    assert!(
        exit.code() == Some(1) && err.contains(&format!("listen: binding {taken}")),
        "{exit:?}: {err}"
    );
    cluster.url = format!("{active},http://{standby_addr}");
    cluster.add_worker("w1");
    wait_registered(&cluster, 1).await;
    let id = if frozen {
        // the worker waiting for a task on the active coordinator's connection
        tokio::time::sleep(Duration::from_secs(1)).await;
        None
    } else {
        let id = submit_small_batch(&cluster);
        wait_iteration(&cluster, &id, 2).await;
        Some(id)
    };
    assert!(
        listening.try_recv().is_err(),
        "the standby does not serve while the active one holds the lease"
    );
    // a user watching the job, given both addresses: follows it through the takeover
    let watch_err = cluster.dir.path().join("watch.err");
    let watch = id.as_ref().map(|id| stylefarm_tests::Node {
        child: stylefarm_tests::stylefarm()
            .args(["watch", id])
            .env("STYLEFARM_COORDINATOR", &cluster.url)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&watch_err).unwrap())
            .spawn()
            .unwrap(),
        log: watch_err.clone(),
    });
    if watch.is_some() {
        // connected and watching (it prints nothing meanwhile, with no terminal for its bars)
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let killed = Instant::now();
    if frozen {
        cluster.coordinator.as_ref().unwrap().signal("STOP");
    } else {
        cluster.coordinator.as_mut().unwrap().kill();
    }
    let (serving, line) = listening
        .recv_timeout(Duration::from_secs(30))
        .expect("the standby took over");
    assert!(line.starts_with("listening on"), "{line}");
    let took = serving - killed;
    eprintln!("the standby served {took:?} after the active coordinator was killed");
    assert!(
        took <= Duration::from_secs_f64(2.0 * LEASE_SECS),
        "the standby served {took:?} after the kill"
    );
    // submitted through the CLI given both addresses: the frozen one passed over
    let id = id.unwrap_or_else(|| submit_small_batch(&cluster));
    let status = wait_succeeded(&cluster, &id).await;
    assert!(status.tasks.iter().all(|t| !t.result.is_empty()));
    if let Some(mut watch) = watch {
        let ended = Instant::now();
        let status = loop {
            match watch.child.try_wait().unwrap() {
                Some(status) => break status,
                None if ended.elapsed() > Duration::from_secs(30) => {
                    panic!("watch still runs 30 s after the job: {}", watch.log_text())
                }
                None => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let err = watch.log_text();
        assert!(status.success(), "{err}");
        assert!(
            err.contains("lost the coordinator (") && err.contains("connecting again"),
            "{err}"
        );
    }
}

/// Submits a batch of two small renders (30 iterations at 48 px each); returns its id.
fn submit_small_batch(cluster: &Cluster) -> String {
    submit(cluster, &batch_x_starry(48, 30))
}

/// Kills a coordinator with SIGKILL during a batch job and starts another on the same state: the job
/// completes with every result. With `within_a_lease` (a restart that comes within a lease period of the
/// kill: not on Redis, whose new coordinator waits for the killed one's leader lease to lapse), the task
/// that was running is not rendered again: the new coordinator takes its lease up, and the worker goes on
/// with it.
async fn killed_and_restarted(mut cluster: Cluster, within_a_lease: bool) -> Cluster {
    cluster.add_worker("w1");
    wait_registered(&cluster, 1).await;
    let id = submit_small_batch(&cluster);
    wait_iteration(&cluster, &id, 2).await;
    cluster.coordinator.as_mut().unwrap().kill();
    cluster.start_coordinator();
    let status = wait_succeeded(&cluster, &id).await;
    assert!(status.tasks.iter().all(|t| !t.result.is_empty()));
    if within_a_lease {
        let log = cluster.workers[0].log_text();
        assert_eq!(
            log.matches(" rendering label=").count(),
            status.tasks.len(),
            "a task rendered again: {log}"
        );
        assert!(status.tasks.iter().all(|t| t.attempts == 1), "{status:?}");
    }
    let (ok, out, _) = cluster.cli(&["list"]);
    assert!(
        ok && out.contains(&id) && out.contains("succeeded"),
        "{out}"
    );
    // the worker's device and memory are known to the new coordinator, whether the worker registered
    // with it or went on leasing under its old registration (its lease polls say them): a tiled job is
    // planned for them
    let (ok, out, err) = cluster.cli(&["workers"]);
    let w1: Vec<&str> = out.lines().filter(|l| l.starts_with("w1#")).collect();
    assert!(ok && !w1.is_empty(), "{out} {err}");
    for line in w1 {
        let fields: Vec<&str> = line.split('\t').collect();
        assert!(
            fields[2] == "cpu" && !fields[3].ends_with(" of ?"),
            "w1's device and memory unknown to the restarted coordinator: {line}"
        );
    }
    cluster
}

/// A coordinator that restarted learns a worker's device and memory from its next lease poll, without a
/// new registration (a worker that goes on under its old one): `workers` shows them, and its tiled scales
/// are planned for them. A new registration of the same name gets another id (the registrations are
/// numbered on from the store's last), not the one the worker goes on with.
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_coordinator_learns_a_worker_s_device_from_its_lease_poll() {
    let mut cluster = Cluster::start(10.0, 0.5);
    let (_, worker_id) = worker_by_hand(&cluster, "by-hand").await;
    cluster.coordinator.as_mut().unwrap().kill();
    cluster.start_coordinator();
    let mut workers = pb::worker_service_client::WorkerServiceClient::connect(cluster.url.clone())
        .await
        .unwrap();
    workers
        .lease_task(pb::LeaseTaskRequest {
            worker_id: worker_id.clone(),
            protocol: stylefarm_proto::PROTOCOL,
            device: "cuda:3".into(),
            memory_bytes: 80 << 30,
            ..Default::default()
        })
        .await
        .unwrap();
    let (ok, out, err) = cluster.cli(&["workers"]);
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("{worker_id}\t")))
        .unwrap_or_else(|| panic!("{worker_id} not listed: {out} {err}"));
    let fields: Vec<&str> = line.split('\t').collect();
    assert!(
        ok && fields[2] == "cuda:3" && fields[3].ends_with(" of 80.0 GiB"),
        "{line}"
    );
    let (_, again) = worker_by_hand(&cluster, "by-hand").await;
    assert_ne!(
        again, worker_id,
        "a restarted coordinator handed out an id in use"
    );
}

/// A task leased by hand for `worker_id` ([`worker_by_hand`]), at once (no wait).
async fn lease_by_hand(
    workers: &mut pb::worker_service_client::WorkerServiceClient<tonic::transport::Channel>,
    worker_id: &str,
) -> pb::LeaseTaskResponse {
    workers
        .lease_task(pb::LeaseTaskRequest {
            worker_id: worker_id.to_string(),
            protocol: stylefarm_proto::PROTOCOL,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// A worker's client connected to `cluster` and registered as `name`, as a worker process would be, for a
/// test that speaks for it; and its worker id.
async fn worker_by_hand(
    cluster: &Cluster,
    name: &str,
) -> (
    pb::worker_service_client::WorkerServiceClient<tonic::transport::Channel>,
    String,
) {
    let mut workers = pb::worker_service_client::WorkerServiceClient::connect(cluster.url.clone())
        .await
        .unwrap();
    let worker_id = workers
        .register_worker(pb::RegisterWorkerRequest {
            name: name.into(),
            protocol: stylefarm_proto::PROTOCOL,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    (workers, worker_id)
}

/// Two worker processes given one name (`--name`) are told apart from one that registers again (the same
/// process: RegisterWorkerRequest.instance): `workers` marks both `name-shared` and says what that costs,
/// and the coordinator warns at the second's registration; a process that registers again (listed once),
/// or one that does not say its number (an older worker), is not marked.
#[tokio::test(flavor = "multi_thread")]
async fn two_workers_given_one_name_are_told_apart_from_one_registering_again() {
    let mut cluster = Cluster::new(10.0, 0.3, "embedded");
    cluster.start_coordinator();
    let mut rpc = pb::worker_service_client::WorkerServiceClient::connect(cluster.url.clone())
        .await
        .unwrap();
    for (name, instance) in [
        ("twin", 1),
        ("solo", 3),
        ("solo", 3),
        ("twin", 2),
        ("old", 0),
        ("old", 0),
    ] {
        rpc.register_worker(pb::RegisterWorkerRequest {
            name: name.into(),
            protocol: stylefarm_proto::PROTOCOL,
            instance,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let (ok, out, err) = cluster.cli(&["workers"]);
    assert!(ok, "{err}");
    let mut shared: Vec<&str> = (out.lines())
        .filter(|l| l.contains(",name-shared\t"))
        .map(|l| l.split('\t').next().unwrap())
        .collect();
    shared.sort();
    assert_eq!(shared, ["twin#1", "twin#4"], "{out}");
    // the process that registered again is listed once, by its last id
    assert_eq!(out.lines().count(), 5, "{out}");
    assert!(
        out.contains("solo#3\t") && !out.contains("solo#2\t"),
        "{out}"
    );
    assert!(err.contains("give each worker its own --name"), "{err}");
    let coordinator = cluster.coordinator.as_ref().unwrap();
    let warning = "another worker process runs under this worker's name";
    coordinator
        .wait_logged(warning, Duration::from_secs(10))
        .await;
    let log = coordinator.log_text();
    assert_eq!(log.matches(warning).count(), 1, "{log}");
    assert!(log.contains("others=\"twin#1\""), "{log}");
}

/// A sign-off gives up only the leases it names, by id or by the lease poll they were handed to (a poll the
/// worker gave up as it stopped): another caller that knows the worker's id, from `stylefarm workers`, and
/// signs it off takes none of its tasks; the worker's own sign-off puts both of its tasks back at once,
/// though their leases (60 s) have long to run: the one handed to the poll, which the worker never heard
/// of, at no attempt.
#[tokio::test(flavor = "multi_thread")]
async fn a_sign_off_gives_up_only_the_leases_it_names() {
    let cluster = Cluster::start(60.0, 0.5);
    let job_id = submit(&cluster, &batch_x_starry(32, 2));
    let (mut workers, worker_id) = worker_by_hand(&cluster, "by-hand").await;
    let mut leased = Vec::new();
    for request_id in [5, 6] {
        let lease = workers
            .lease_task(pb::LeaseTaskRequest {
                worker_id: worker_id.clone(),
                protocol: stylefarm_proto::PROTOCOL,
                request_id,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(lease.task.is_some(), "{lease:?}");
        leased.push(lease.lease_id);
    }
    let mut client = cluster.client().await;
    let running = |status: &pb::JobStatus| {
        status
            .tasks
            .iter()
            .filter(|t| t.state == pb::TaskState::Running as i32)
            .count()
    };
    // another registration signs the worker off by its id: naming no lease of it, it takes none
    let (mut intruder, _) = worker_by_hand(&cluster, "intruder").await;
    intruder
        .sign_off(pb::SignOffRequest {
            worker_id: worker_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(running(&job(&mut client, &job_id).await), 2, "none named");
    workers
        .sign_off(pb::SignOffRequest {
            worker_id: worker_id.clone(),
            lease_ids: vec![leased[1].clone()],
            lease_request_id: 5,
        })
        .await
        .unwrap();
    let status = wait_for("both tasks back", Duration::from_secs(5), || {
        let (mut client, job_id) = (client.clone(), job_id.clone());
        async move {
            let status = job(&mut client, &job_id).await;
            (running(&status) == 0).then_some(status)
        }
    })
    .await;
    // the one named by id was given up unfinished; the one named by its poll, never heard of since (its
    // worker never saw it), went back at no cost
    let mut ended: Vec<(u32, bool)> = (status.tasks.iter())
        .map(|t| (t.attempts, t.error.contains("signed off")))
        .collect();
    ended.sort();
    assert_eq!(ended, [(0, false), (1, true)], "{status:?}");
}

/// A worker's checkpoint is kept only under a live lease of a job with checkpoints, and only once checked:
/// bytes that are not a checkpoint file, one larger than the task's image takes, or one of a scale,
/// iteration or size the task does not have are refused naming `checkpoint`, and the task keeps the last
/// good one, which its status shows.
#[tokio::test(flavor = "multi_thread")]
async fn a_checkpoint_is_checked_before_it_is_kept() {
    use stylefarm_core::checkpoint::CheckpointFile;
    let cluster = Cluster::start(30.0, 0.5);
    let plain = submit(&cluster, &tubingen_x_starry(64, 20));
    let mut args = tubingen_x_starry(64, 20);
    args.extend(["--checkpoint-every", "5"].map(String::from));
    let checkpointed = submit(&cluster, &args);
    let (workers, worker_id) = worker_by_hand(&cluster, "by-hand").await;
    let lease = || {
        let mut workers = workers.clone();
        let worker_id = worker_id.clone();
        async move {
            workers
                .lease_task(pb::LeaseTaskRequest {
                    worker_id,
                    protocol: stylefarm_proto::PROTOCOL,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let save = |lease_id: String, size: Option<u64>, bytes: Vec<u8>| {
        use pb::save_checkpoint_request::Part;
        let mut parts = vec![Part::LeaseId(lease_id)];
        parts.extend(size.map(Part::SizeBytes));
        parts.push(Part::Data(bytes));
        let mut workers = workers.clone();
        async move {
            workers
                .save_checkpoint(tokio_stream::iter(
                    parts
                        .into_iter()
                        .map(|p| pb::SaveCheckpointRequest { part: Some(p) }),
                ))
                .await
        }
    };
    // 64 x 48: tubingen.jpg at 64 px
    let file = |scale: u32, iteration: u32, width: u32| {
        CheckpointFile {
            scale,
            iteration,
            width,
            height: 48,
            preprocessing: "caffe".into(),
            values: vec![0.5; 3 * 48 * width as usize],
            adam: None,
            average: None,
        }
        .encode()
        .unwrap()
    };
    let first = lease().await;
    assert_eq!(first.task.as_ref().unwrap().job_id, plain);
    let task = first.task.as_ref().unwrap();
    assert_eq!((task.checkpoint_every, task.checkpoint_secs), (0, 0));
    let reply = save(first.lease_id, None, file(1, 5, 64)).await.unwrap();
    assert!(
        !reply.get_ref().accepted,
        "a job without checkpoints keeps none"
    );

    let second = lease().await;
    let task = second.task.as_ref().unwrap();
    assert_eq!(
        (&task.job_id, task.checkpoint_every, task.checkpoint_secs),
        (&checkpointed, 5, 0)
    );
    let lease_id = second.lease_id;
    for (size, bytes, message) in [
        (
            None,
            b"not a checkpoint".to_vec(),
            "checkpoint: not a safetensors file",
        ),
        (
            Some(1 << 30),
            file(1, 5, 64),
            "checkpoint: 1073741824 bytes, more than",
        ),
        (
            None,
            file(2, 5, 64),
            "checkpoint: of scale 2: the task's render has 1 scale(s)",
        ),
        (
            None,
            file(1, 20, 64),
            "checkpoint: at iteration 20: scale 1 has 20 iterations",
        ),
        (
            None,
            file(1, 5, 65),
            "checkpoint: a 65 x 48 image: the task's is at most 64 px",
        ),
    ] {
        let err = save(lease_id.clone(), size, bytes).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{message}: {err:?}");
        assert!(err.message().starts_with(message), "{message}: {err:?}");
    }
    let mut client = cluster.client().await;
    assert_eq!(
        job(&mut client, &checkpointed).await.tasks[0].checkpoint,
        None
    );
    let good = file(1, 10, 64);
    let reply = save(lease_id.clone(), Some(good.len() as u64), good.clone()).await;
    assert!(reply.unwrap().get_ref().accepted);
    let kept = job(&mut client, &checkpointed).await.tasks[0]
        .checkpoint
        .clone()
        .unwrap();
    assert_eq!((kept.scale, kept.iteration), (1, 10));
    let (ok, out, _) = cluster.cli(&["status", &checkpointed]);
    assert!(
        ok && out.contains("checkpoint scale 1 iteration 10"),
        "{out}"
    );
    assert_eq!(
        kept.sha256,
        stylefarm_core::job::ImageHash::of(&good).to_string()
    );
    // and the coordinator downloads it as it was sent
    let download = |sha256: String| {
        let mut workers = workers.clone();
        async move {
            let mut stream = workers
                .download_image(pb::DownloadRequest { sha256 })
                .await?
                .into_inner();
            let mut downloaded = Vec::new();
            while let Some(chunk) = stream.message().await? {
                downloaded.extend(chunk.data);
            }
            Ok::<_, tonic::Status>(downloaded)
        }
    };
    assert_eq!(download(kept.sha256.clone()).await.unwrap(), good);
    // a newer one replaces it, and its blob goes at once (no collection is configured here)
    let newer = file(1, 15, 64);
    let reply = save(lease_id.clone(), None, newer.clone()).await;
    assert!(reply.unwrap().get_ref().accepted);
    assert_eq!(
        download(kept.sha256).await.unwrap_err().code(),
        Code::NotFound
    );
    let kept = job(&mut client, &checkpointed).await.tasks[0]
        .checkpoint
        .clone()
        .unwrap();
    assert_eq!(download(kept.sha256).await.unwrap(), newer);
}

/// A result that a worker sends for a task whose job was cancelled meanwhile is discarded unread, and the
/// lines it carries (they come before the image's bytes) are kept in the task's log, whose attempt ends
/// "cancelled: its result discarded".
#[tokio::test(flavor = "multi_thread")]
async fn a_result_of_a_cancelled_job_is_discarded_and_its_log_lines_kept() {
    let cluster = Cluster::start(30.0, 0.5);
    let id = submit(&cluster, &tubingen_x_starry(64, 20));
    let (mut workers, worker_id) = worker_by_hand(&cluster, "by-hand").await;
    let leased = lease_by_hand(&mut workers, &worker_id).await;
    assert_eq!(leased.task.unwrap().job_id, id);
    let (ok, _, err) = cluster.cli(&["cancel", &id]);
    assert!(ok, "{err}");
    use pb::complete_task_request::Part;
    let parts = [
        Part::LeaseId(leased.lease_id),
        Part::SizeBytes(1 << 20),
        Part::Log(pb::TaskLogLines {
            lines: vec!["2026-12-05T00:00:00Z INFO rendered engine_s=1.5".into()],
            ..Default::default()
        }),
        Part::Data(vec![0u8; 1 << 20]),
    ];
    let reply = workers
        .complete_task(tokio_stream::iter(
            parts.map(|p| pb::CompleteTaskRequest { part: Some(p) }),
        ))
        .await
        .unwrap();
    assert!(!reply.get_ref().accepted);
    let attempts = stylefarm_tests::task_log(&cluster, &id, 0);
    assert_eq!(attempts.len(), 1, "{attempts:#?}");
    let (head, lines) = &attempts[0];
    assert!(
        head.contains("\tby-hand") && head.ends_with("\tcancelled: its result discarded"),
        "{head}"
    );
    assert!(lines.contains("INFO rendered engine_s=1.5"), "{lines}");
}

/// What one worker sends cannot hurt another's lease nor a job's status: lease ids are random (not
/// guessed), a heartbeat for another worker's lease is told to stop and renews nothing, and a failure's
/// error of megabytes is kept as one line of at most 1 KiB, so that the job's status still fits a reply.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_s_reports_cannot_hurt_another_s_lease_nor_the_job_s_status() {
    let cluster = Cluster::start(30.0, 0.5);
    let id = submit(&cluster, &tubingen_x_starry(64, 20));
    let (mut workers, worker_id) = worker_by_hand(&cluster, "by-hand").await;
    let leased = lease_by_hand(&mut workers, &worker_id).await;
    let hex = leased.lease_id.strip_prefix("lease-").unwrap_or_default();
    assert!(
        hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "{}",
        leased.lease_id
    );
    let (mut intruder, intruder_id) = worker_by_hand(&cluster, "intruder").await;
    let beat = |worker_id: &str| pb::HeartbeatRequest {
        worker_id: worker_id.into(),
        lease_id: leased.lease_id.clone(),
        ..Default::default()
    };
    let reply = intruder
        .heartbeat(beat(&intruder_id))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.cancel && reply.lease_deadline_ms == 0, "{reply:?}");
    let reply = workers
        .heartbeat(beat(&worker_id))
        .await
        .unwrap()
        .into_inner();
    assert!(!reply.cancel && reply.lease_deadline_ms > 0, "{reply:?}");
    let error = "out of patience\n".repeat(200_000);
    workers
        .fail_task(pb::FailTaskRequest {
            lease_id: leased.lease_id.clone(),
            error,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut client = cluster.client().await;
    let status = job(&mut client, &id).await;
    let kept = &status.tasks[0].error;
    assert!(
        kept.starts_with("out of patience out of patience") && kept.len() <= 1024,
        "{} bytes",
        kept.len()
    );
    let (ok, _, err) = cluster.cli(&["status", &id]);
    assert!(ok, "{err}");
}

/// `fetch` of a batch still running writes the results so far into a folder and says that the job is
/// not over; into an image file name it is refused: one result done is not the job's result. Over a file
/// that holds one of the job's inputs it is refused, naming `output`, and writes nothing. Once the job is
/// cancelled, it writes them and fails, saying the job ended unfinished (and `watch` of it fails too).
#[tokio::test(flavor = "multi_thread")]
async fn fetch_of_an_unfinished_batch_writes_its_results_so_far_and_says_so() {
    let cluster = Cluster::start(30.0, 0.5);
    let id = submit(&cluster, &batch_x_starry(48, 1));
    let (mut workers, worker_id) = worker_by_hand(&cluster, "by-hand").await;
    let leased = lease_by_hand(&mut workers, &worker_id).await;
    let task = leased.task.unwrap();
    let content = match task.label.contains("chelsea") {
        true => "chelsea.png",
        false => "tubingen.jpg",
    };
    let (w, h) = image::image_dimensions(shared_image(content)).unwrap();
    let (w, h) = stylefarm_core::imaging::working_size(w, h, 48);
    use pb::complete_task_request::Part;
    let parts = [
        Part::LeaseId(leased.lease_id),
        Part::Data(png_of(&image::RgbImage::new(w, h))),
    ];
    let reply = workers
        .complete_task(tokio_stream::iter(
            parts.map(|p| pb::CompleteTaskRequest { part: Some(p) }),
        ))
        .await
        .unwrap();
    assert!(reply.get_ref().accepted);
    let file = cluster.dir.path().join("out.png");
    let (ok, _, err) = cluster.cli(&["fetch", &id, "-o", file.to_str().unwrap()]);
    assert!(!ok && err.contains("the job has several results"), "{err}");
    let folder = cluster.dir.path().join("so-far");
    let (ok, out, err) = cluster.cli(&["fetch", &id, "-o", folder.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        err.contains("the job is running: its results so far (1 of 2 tasks)"),
        "{err}"
    );
    // the result's file now holds the style image: not written over
    let written = std::path::PathBuf::from(out.trim());
    let style = std::fs::read(shared_image("starry_night.jpg")).unwrap();
    std::fs::write(&written, &style).unwrap();
    let (ok, _, err) = cluster.cli(&["fetch", &id, "-o", folder.to_str().unwrap()]);
    assert!(
        !ok && err.contains("output: ") && err.contains("is one of the job's input images"),
        "{err}"
    );
    assert_eq!(std::fs::read(&written).unwrap(), style);
    std::fs::remove_file(&written).unwrap();
    let (ok, _, err) = cluster.cli(&["cancel", &id]);
    assert!(ok, "{err}");
    let (ok, out, err) = cluster.cli(&["fetch", &id, "-o", folder.to_str().unwrap()]);
    assert!(!ok, "{out} {err}");
    assert_eq!(out.trim(), written.to_str().unwrap());
    assert!(
        err.contains("the job ended unfinished: the results of 1 of its 2 tasks")
            && err.contains("cancelled"),
        "{err}"
    );
    // as `watch` of it does
    let (ok, _, err) = cluster.cli(&["watch", &id]);
    assert!(!ok && err.contains(&format!("job {id} cancelled")), "{err}");
}

/// A result of another size than its task's (a buggy worker's: a tile's region, or the content at the
/// task's size), or one that does not decode, is refused naming `result`, and its attempt fails, to run
/// again: kept, it would fail the scale's stitch, and the job for good, or be the job's result.
#[tokio::test(flavor = "multi_thread")]
async fn a_tile_s_result_of_another_size_is_refused_and_the_tile_runs_again() {
    let cluster = Cluster::start(30.0, 0.5);
    let mut args = tubingen_x_starry(256, 1);
    args.extend(
        [
            "--tiled",
            "--scales",
            "2",
            "--tile-size",
            "128",
            "--overlap",
            "64",
        ]
        .map(String::from),
    );
    let id = submit(&cluster, &args);
    let (mut workers, worker_id) = worker_by_hand(&cluster, "by-hand").await;
    let leasing = workers.clone();
    let lease = || {
        let (mut workers, worker_id) = (leasing.clone(), worker_id.clone());
        async move {
            workers
                .lease_task(pb::LeaseTaskRequest {
                    worker_id,
                    wait_ms: 10_000,
                    protocol: stylefarm_proto::PROTOCOL,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let send = |lease_id: String, png: Vec<u8>| {
        use pb::complete_task_request::Part;
        tokio_stream::iter(
            [Part::LeaseId(lease_id), Part::Data(png)]
                .map(|p| pb::CompleteTaskRequest { part: Some(p) }),
        )
    };
    // the first scale, whole: the content at 128 px (tubingen is 4:3), and nothing else
    let first = lease().await;
    assert!(first.task.as_ref().unwrap().tile.is_none());
    let err = workers
        .complete_task(send(first.lease_id, png_of(&image::RgbImage::new(64, 48))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(
        err.message(),
        "result: 64x48 px, where the task's is 128x96 px"
    );
    // bytes that are no image: refused the same way, its attempt failed at once (not left running until
    // its lease lapses: the next lease, within 10 s of a 30-s lease, gets the task again)
    let first = lease().await;
    let err = workers
        .complete_task(send(first.lease_id, b"not an image".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("result: "), "{err:?}");
    let first = lease().await;
    assert!(first.task.as_ref().unwrap().tile.is_none());
    let reply = workers
        .complete_task(send(first.lease_id, png_of(&image::RgbImage::new(128, 96))))
        .await
        .unwrap();
    assert!(reply.get_ref().accepted);
    // a tile of the second: 1 x 1 px back
    let tile = lease().await;
    assert!(tile.task.as_ref().unwrap().tile.is_some(), "{tile:?}");
    let err = workers
        .complete_task(send(tile.lease_id, png_of(&image::RgbImage::new(1, 1))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("result: 1x1 px"), "{err:?}");
    let status = job(&mut cluster.client().await, &id).await;
    let index = tile.task.unwrap().index as usize;
    let task = &status.tasks[index];
    assert_eq!(task.state(), pb::TaskState::Pending, "{task:?}");
    assert!(task.error.starts_with("result: 1x1 px"), "{task:?}");
    assert_eq!(status.state(), pb::JobState::Running);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_with_the_field_named_and_the_coordinator_keeps_serving() {
    let cluster = Cluster::start(10.0, 0.5);
    let client = cluster.client().await;
    // an --output the results could not go to: refused before anything is submitted
    let out = cluster.dir.path().join("out.png").display().to_string();
    for (mut args, needle) in [
        (
            tubingen_x_starry(32, 1),
            "output: --output is written once the job is done, with --wait",
        ),
        (batch_x_starry(32, 1), "the job has several results"),
    ] {
        if needle.contains("several") {
            args.push("--wait".into());
        }
        args.extend(["-o".to_string(), out.clone()]);
        let args: Vec<&str> = std::iter::once("submit")
            .chain(args.iter().map(String::as_str))
            .collect();
        let (ok, _, err) = cluster.cli(&args);
        assert!(!ok && err.contains(needle), "{args:?}: {err}");
    }
    let (ok, listed, err) = cluster.cli(&["list"]);
    assert!(
        ok && !listed.contains("job-"),
        "no job submitted: {listed}{err}"
    );
    let upload = |data: Vec<u8>| {
        tokio_stream::iter(vec![pb::UploadImageRequest {
            part: Some(pb::upload_image_request::Part::Data(data)),
        }])
    };
    let err = client
        .rpc()
        .upload_image(upload(b"\x89PNG\r\n\x1a\nnot really".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("image"), "{}", err.message());
    // a declared size past the largest image is refused before its data; data that do not add up to
    // the size declared are refused
    let declared = |size: u64, data: Vec<u8>| {
        use pb::upload_image_request::Part;
        let parts = [Part::SizeBytes(size), Part::Data(data)];
        tokio_stream::iter(parts.map(|part| pb::UploadImageRequest { part: Some(part) }))
    };
    for (size, data, message) in [
        (
            1 << 40,
            1 << 20,
            "image: 1099511627776 bytes (size_bytes): larger than 512 MiB",
        ),
        (10, 20, "size_bytes: 10 declared, and more data sent"),
        (30, 20, "size_bytes: 30 declared, 20 received"),
    ] {
        let err = client
            .rpc()
            .upload_image(declared(size, vec![0u8; data]))
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), err.message()),
            (Code::InvalidArgument, message)
        );
    }
    // the expected hash twice, or after the data
    for parts in [[0, 0, 1], [1, 0, 1]] {
        use pb::upload_image_request::Part;
        let part = |p| match p {
            0 => Part::ExpectedSha256("0".repeat(64)),
            _ => Part::Data(b"data".to_vec()),
        };
        let parts = parts.map(|p| pb::UploadImageRequest {
            part: Some(part(p)),
        });
        let err = client
            .rpc()
            .upload_image(tokio_stream::iter(parts))
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), err.message()),
            (
                Code::InvalidArgument,
                "expected_sha256: once, before the data"
            )
        );
    }

    let png = std::fs::read(shared_image("chelsea.png")).unwrap();
    let hash = client
        .rpc()
        .upload_image(upload(png))
        .await
        .unwrap()
        .into_inner()
        .sha256;
    let spec = |params: pb::RenderParams| pb::SubmitJobRequest {
        spec: Some(pb::JobSpec {
            kind: Some(Kind::Single(Default::default())),
            contents: vec![hash.clone()],
            styles: vec![hash.clone()],
            params: Some(params),
            ..Default::default()
        }),
        client_request_id: String::new(),
        paused: false,
    };
    let cases = [
        (
            pb::RenderParams {
                size: Some(0),
                ..Default::default()
            },
            "size",
        ),
        (
            pb::RenderParams {
                size: Some(100_000),
                ..Default::default()
            },
            "size",
        ),
        (
            pb::RenderParams {
                style_weight: Some(f64::NAN),
                ..Default::default()
            },
            "style_weight",
        ),
        (
            pb::RenderParams {
                tv_weight: Some(-1.0),
                ..Default::default()
            },
            "tv_weight",
        ),
        (
            pb::RenderParams {
                iterations: Some(0),
                ..Default::default()
            },
            "iterations",
        ),
        (
            pb::RenderParams {
                iterations: Some(1_000_000),
                ..Default::default()
            },
            "iterations",
        ),
        (
            pb::RenderParams {
                optimizer: Some(99),
                ..Default::default()
            },
            "optimizer",
        ),
        (
            pb::RenderParams {
                content_weight: Some(1e39),
                ..Default::default()
            },
            "content_weight",
        ),
    ];
    for (params, field) in cases {
        let err = client.rpc().submit_job(spec(params)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    let mut not_uploaded = spec(pb::RenderParams::default());
    not_uploaded.spec.as_mut().unwrap().styles = vec!["0".repeat(64)];
    let err = client.rpc().submit_job(not_uploaded).await.unwrap_err();
    assert!(
        err.code() == Code::InvalidArgument && err.message().starts_with("styles"),
        "{err:?}"
    );
    // an idempotency key of more than 256 bytes (kept with the job, written at each of its records)
    let mut long_key = spec(pb::RenderParams::default());
    long_key.client_request_id = "k".repeat(257);
    let err = client.rpc().submit_job(long_key).await.unwrap_err();
    assert!(
        err.code() == Code::InvalidArgument
            && err.message() == "client_request_id: 257 bytes: at most 256",
        "{err:?}"
    );
    // checkpoints every so many iterations or every so many seconds, not both
    let mut both = spec(pb::RenderParams::default());
    let s = both.spec.as_mut().unwrap();
    (s.checkpoint_every, s.checkpoint_secs) = (10, 60);
    let err = client.rpc().submit_job(both).await.unwrap_err();
    assert!(
        err.code() == Code::InvalidArgument && err.message().starts_with("checkpoint_secs: "),
        "{err:?}"
    );

    let err = client
        .rpc()
        .get_job(pb::GetJobRequest {
            job_id: "job-nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .rpc()
        .get_job(pb::GetJobRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "job_id: missing")
    );
    let err = client
        .rpc()
        .cancel_job(pb::CancelJobRequest {
            job_id: "job-nope".into(),
            tasks: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .rpc()
        .list_jobs(pb::ListJobsRequest {
            states: vec![],
            limit: 0,
            page_token: "next, please".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("page_token"), "{err:?}");

    // one message above gRPC's 4 MiB: refused as a unary call over it is, naming the field, not a crash
    let err = client
        .rpc()
        .upload_image(upload(vec![0u8; 5 << 20]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().starts_with("data: ") && err.message().contains(&(4 << 20).to_string()),
        "{err:?}"
    );

    // a worker with a malformed tag, registering or asking for work: refused naming its tags
    let mut workers = stylefarm_proto::pb::worker_service_client::WorkerServiceClient::connect(
        cluster.url.clone(),
    )
    .await
    .unwrap();
    // a name with a line break would list the worker on two lines
    for name in ["", "bad\nname", &"n".repeat(201)] {
        let err = workers
            .register_worker(pb::RegisterWorkerRequest {
                name: name.into(),
                protocol: stylefarm_proto::PROTOCOL,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().starts_with("name") && err.message().contains("control"),
            "{err:?}"
        );
    }
    let bad_tags = vec!["gpu".to_string(), "has space".to_string()];
    let err = workers
        .register_worker(pb::RegisterWorkerRequest {
            name: "tagged".into(),
            tags: bad_tags.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("tags"), "{err:?}");
    let err = workers
        .lease_task(pb::LeaseTaskRequest {
            worker_id: "tagged#1".into(),
            tags: bad_tags,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(err.message().starts_with("tags"), "{err:?}");
    // a heartbeat without its worker, a failure without its lease: refused naming the field, as a lease
    // without its worker is
    let err = workers
        .heartbeat(pb::HeartbeatRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "worker_id: missing")
    );
    let err = workers
        .fail_task(pb::FailTaskRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "lease_id: missing")
    );
    // a worker that speaks an older render protocol (here one that predates the field), registering or
    // asking for work: refused naming the protocol, as it would render tasks' new options as absent
    let err = workers
        .register_worker(pb::RegisterWorkerRequest {
            name: "old".into(),
            protocol: stylefarm_proto::PROTOCOL - 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().starts_with("protocol") && err.message().contains("upgrade the worker"),
        "{err:?}"
    );
    let err = workers
        .lease_task(pb::LeaseTaskRequest {
            worker_id: "old#1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().starts_with("protocol"), "{err:?}");
    // one newer than the coordinator reads every field it sends: taken
    workers
        .register_worker(pb::RegisterWorkerRequest {
            name: "new".into(),
            protocol: stylefarm_proto::PROTOCOL + 1,
            ..Default::default()
        })
        .await
        .unwrap();
    // a device text or a worker id longer than the registry keeps: refused naming the field
    let err = workers
        .register_worker(pb::RegisterWorkerRequest {
            name: "chatty".into(),
            device: "x".repeat(1 << 20),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("device"), "{err:?}");
    let err = workers
        .lease_task(pb::LeaseTaskRequest {
            worker_id: "w".repeat(1 << 20),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(err.message().starts_with("worker_id"), "{err:?}");
    let err = workers
        .heartbeat(pb::HeartbeatRequest {
            worker_id: "w".repeat(1 << 20),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(err.message().starts_with("worker_id"), "{err:?}");
    // a result for a lease that is no one's: answered 'not accepted' at once, its 64 MiB unread; a
    // result whose data comes before its lease: refused naming lease_id
    let result = |lease: Option<&str>, chunks: usize| {
        let lease = lease.map(|id| pb::CompleteTaskRequest {
            part: Some(pb::complete_task_request::Part::LeaseId(id.into())),
        });
        let data = (0..chunks).map(|_| pb::CompleteTaskRequest {
            part: Some(pb::complete_task_request::Part::Data(vec![0u8; 1 << 20])),
        });
        tokio_stream::iter(lease.into_iter().chain(data).collect::<Vec<_>>())
    };
    let reply = workers
        .complete_task(result(Some("lease-of-no-one"), 64))
        .await
        .unwrap();
    assert!(!reply.get_ref().accepted);
    let err = workers.complete_task(result(None, 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("lease_id"), "{err:?}");
    // the same for a checkpoint
    let checkpoint = |lease: Option<&str>, chunks: usize| {
        let lease = lease.map(|id| pb::SaveCheckpointRequest {
            part: Some(pb::save_checkpoint_request::Part::LeaseId(id.into())),
        });
        let data = (0..chunks).map(|_| pb::SaveCheckpointRequest {
            part: Some(pb::save_checkpoint_request::Part::Data(vec![0u8; 1 << 20])),
        });
        tokio_stream::iter(lease.into_iter().chain(data).collect::<Vec<_>>())
    };
    let reply = workers
        .save_checkpoint(checkpoint(Some("lease-of-no-one"), 64))
        .await
        .unwrap();
    assert!(!reply.get_ref().accepted);
    let err = workers
        .save_checkpoint(checkpoint(None, 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("lease_id"), "{err:?}");

    // a job's name: refused over the wire with a control character or past 200 bytes, naming it
    for name in ["a\tb".to_string(), "x".repeat(201)] {
        let mut request = spec(pb::RenderParams {
            size: Some(32),
            ..Default::default()
        });
        request.spec.as_mut().unwrap().name = name;
        let err = client.rpc().submit_job(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().starts_with("name"), "{err:?}");
    }
    let (ok, _, err) = cluster.cli(
        &[
            &["submit", "--name", "a\nb"][..],
            &tubingen_x_starry(32, 1)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        ]
        .concat(),
    );
    assert!(!ok && err.contains("name: at most 200 bytes"), "{err}");

    let ok = client
        .rpc()
        .submit_job(spec(pb::RenderParams {
            size: Some(32),
            iterations: Some(1),
            ..Default::default()
        }))
        .await;
    assert!(ok.is_ok(), "still serving: {ok:?}");
    // and a name, shown beside the job's id by `list` and `status`
    let mut args = vec![
        "submit".to_string(),
        "--name".into(),
        "holiday batch".into(),
    ];
    args.extend(tubingen_x_starry(32, 1));
    let (ok, out, err) = cluster.cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    let named = out.trim().to_string();
    let (ok, listed, err) = cluster.cli(&["list"]);
    assert!(
        ok && listed.contains(&format!("{named} \"holiday batch\"\t")),
        "{listed} {err}"
    );
    let (ok, status, err) = cluster.cli(&["status", &named]);
    assert!(
        ok && status.starts_with(&format!("{named} \"holiday batch\"\t")),
        "{status} {err}"
    );
}

/// Uploads `bytes`; returns the sha256.
async fn upload(client: &mut RenderClient, bytes: Vec<u8>) -> String {
    client
        .rpc()
        .upload_image(tokio_stream::iter(vec![pb::UploadImageRequest {
            part: Some(pb::upload_image_request::Part::Data(bytes)),
        }]))
        .await
        .unwrap()
        .into_inner()
        .sha256
}

fn png_of(img: &image::RgbImage) -> Vec<u8> {
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    png
}

/// A job whose any task would be too small for VGG19 (at any scale, tile or sweep point) is refused at
/// submission, naming the field, the image and both sizes, before any task exists.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_too_small_for_vgg19_anywhere_is_refused_at_submission() {
    let cluster = Cluster::start(10.0, 0.5);
    let mut client = cluster.client().await;
    let photo = upload(
        &mut client,
        png_of(&image::RgbImage::from_fn(60, 40, |x, y| {
            image::Rgb([x as u8 * 4, y as u8 * 6, 90])
        })),
    )
    .await;
    // 1 x 300 px: 2 x 512 at the default size
    let thin = upload(&mut client, png_of(&image::RgbImage::new(1, 300))).await;
    // 1000 x 40: fine at 1000 px, 128 x 5 at the first of a tiled job's scales for a 128-px tile
    let wide = upload(&mut client, png_of(&image::RgbImage::new(1000, 40))).await;
    let spec = |kind: Kind, content: &str, params: pb::RenderParams| pb::JobSpec {
        kind: Some(kind),
        contents: vec![content.to_string()],
        styles: vec![photo.clone()],
        params: Some(params),
        ..Default::default()
    };
    let cases = [
        (
            spec(
                Kind::Single(Default::default()),
                &photo,
                pb::RenderParams {
                    style_scale: Some(0.01),
                    ..Default::default()
                },
            ),
            "style_scale",
            "5 x 3 px",
        ),
        (
            spec(
                Kind::Single(Default::default()),
                &thin,
                pb::RenderParams::default(),
            ),
            "size",
            "2 x 512 px",
        ),
        (
            spec(
                Kind::Sweep(pb::job_spec::Sweep {
                    axes: vec![pb::SweepAxis {
                        parameter: "style_scale".into(),
                        values: vec!["1".into(), "0.01".into()],
                    }],
                }),
                &photo,
                pb::RenderParams::default(),
            ),
            "style_scale",
            "style_scale=0.01",
        ),
        (
            spec(
                Kind::Tiled(pb::job_spec::Tiled {
                    tile_size: 128,
                    overlap: 64,
                    exact: false,
                }),
                &wide,
                pb::RenderParams {
                    size: Some(1000),
                    ..Default::default()
                },
            ),
            // the tile size, which made the scales more than asked for
            "tile_size",
            "scale 1 of",
        ),
    ];
    for (spec, field, detail) in cases {
        let err = client
            .rpc()
            .submit_job(pb::SubmitJobRequest {
                spec: Some(spec),
                client_request_id: String::new(),
                paused: false,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(&format!("{field}:"))
                && err.message().contains(detail)
                && err.message().contains("relu5_1"),
            "{field}: {}",
            err.message()
        );
    }
    // the command names the file, not its sha256 (the coordinator knows only the hash)
    let thin_file = cluster.dir.path().join("thin.png");
    std::fs::write(&thin_file, png_of(&image::RgbImage::new(1, 300))).unwrap();
    let style = shared_image("starry_night.jpg");
    let (ok, _, err) = cluster.cli(&[
        "submit",
        "--content",
        thin_file.to_str().unwrap(),
        "--style",
        style.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains(&format!(
            "content image {} (1 x 300 px)",
            thin_file.display()
        )) && !err.contains(&thin),
        "{err}"
    );
    let listed = client
        .rpc()
        .list_jobs(pb::ListJobsRequest {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.jobs.is_empty(), "no job was created");
}

/// Adds the cluster's one worker, "only", whose first three renders panic (a fail point), and submits a
/// small job (tubingen x starry night, 32 px, 2 iterations) once it has registered; the job's id.
async fn submit_to_a_poisoned_worker(cluster: &mut Cluster) -> String {
    cluster.add_worker_with_env(
        "only",
        &[("FAILPOINTS", "engine-render=3*panic(poisoned render)")],
    );
    wait_registered(cluster, 1).await;
    let args = tubingen_x_starry(32, 2);
    let common: Vec<&str> = args.iter().map(String::as_str).collect();
    submit(cluster, &common)
}

/// A job that every live worker is blocklisted for fails, saying so, once it has waited
/// `--no-worker-left-secs` for another, instead of waiting forever: here the only worker fails it three
/// times (three strikes) while its task has attempts left (`--max-attempts 10`).
#[tokio::test(flavor = "multi_thread")]
async fn a_job_no_live_worker_may_take_fails_instead_of_waiting_forever() {
    let mut cluster = Cluster::new(10.0, 0.3, "embedded");
    cluster.coordinator_args = ["--max-attempts", "10", "--no-worker-left-secs", "2"]
        .map(String::from)
        .to_vec();
    cluster.start_coordinator();
    let stranded = submit_to_a_poisoned_worker(&mut cluster).await;
    let failed = wait_state(
        &cluster,
        &stranded,
        pb::JobState::Failed,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(failed.tasks[0].attempts, 3, "{failed:?}");
    assert!(
        failed.error.starts_with("no worker left to run it")
            && failed.error.contains("only")
            && failed.error.contains("poisoned render"),
        "{failed:?}"
    );
}

/// On a coordinator with ONE worker, a job whose renders panic on the engine thread (a fault injected with
/// fail points: the first three renders) fails alone; the worker survives, and the good job after it
/// renders on that same worker. With the fault gone, `stylefarm retry` runs the failed job again and it
/// renders.
#[tokio::test(flavor = "multi_thread")]
async fn a_poisoned_job_fails_alone_and_the_next_job_renders_on_the_same_worker() {
    let mut cluster = Cluster::start(10.0, 0.3);
    let poisoned = submit_to_a_poisoned_worker(&mut cluster).await;
    let args = tubingen_x_starry(32, 2);
    let common: Vec<&str> = args.iter().map(String::as_str).collect();
    let client = cluster.client().await;
    let failed = wait_for("the poisoned job to fail", Duration::from_secs(60), || {
        let mut client = client.clone();
        let poisoned = poisoned.clone();
        async move {
            let s = job(&mut client, &poisoned).await;
            is(&s, pb::JobState::Failed).then_some(s)
        }
    })
    .await;
    assert_eq!(failed.tasks[0].attempts, 3, "{failed:?}");
    assert!(
        failed.error.contains("poisoned render") && failed.tasks[0].error.contains("panicked"),
        "{failed:?}"
    );
    let (ok, out, _) = cluster.cli(&["status", &poisoned]);
    assert!(
        ok && out.contains("poisoned render"),
        "status shows the error: {out}"
    );

    // the good job: a cut-out logo, whose result keeps its alpha
    let logo = cluster.dir.path().join("logo.png");
    image::RgbaImage::from_fn(48, 32, |x, y| {
        image::Rgba([30, (y * 7) as u8, 200, if x < 24 { 0 } else { 255 }])
    })
    .save(&logo)
    .unwrap();
    let good = submit(
        &cluster,
        &[&["--content", logo.to_str().unwrap()], &common[2..]].concat(),
    );
    let done = wait_state(
        &cluster,
        &good,
        pb::JobState::Succeeded,
        Duration::from_secs(60),
    )
    .await;
    assert!(done.tasks[0].worker_id.starts_with("only"), "{done:?}");
    assert_eq!(done.tasks[0].attempts, 1);
    let log = cluster.workers[0].log_text();
    assert_eq!(
        log.matches("registered").count(),
        1,
        "one registration: {log}"
    );
    let mut stream = client
        .rpc()
        .download_result(pb::DownloadRequest {
            sha256: done.tasks[0].result.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut png = Vec::new();
    while let Some(chunk) = tokio_stream::StreamExt::next(&mut stream).await {
        png.extend(chunk.unwrap().data);
    }
    let result = image::load_from_memory(&png).unwrap().to_rgba8();
    assert_eq!(result.dimensions(), (32, 21));
    for (x, _, p) in result.enumerate_pixels() {
        // the content's alpha, resampled to 32 px (Lanczos3 rings for ~3 px around the edge at 16)
        if x < 12 {
            assert_eq!(p.0[3], 0, "alpha at x = {x}");
        } else if x > 19 {
            assert_eq!(p.0[3], 255, "alpha at x = {x}");
        }
    }

    // the failed jobs, listed by their state
    let (ok, out, err) = cluster.cli(&["list", "--state", "failed", "--state", "cancelled"]);
    assert!(
        ok && out.contains(&poisoned) && !out.contains(&good),
        "{out} {err}"
    );
    // a list cut at its limit says so; one that is not, does not
    let (ok, out, err) = cluster.cli(&["list", "--limit", "1"]);
    assert!(
        ok && out.lines().count() == 1 && err.contains("(the newest 1 shown; --limit N shows more"),
        "{out} {err}"
    );
    let (ok, out, err) = cluster.cli(&["list", "--limit", "2"]);
    assert!(
        ok && out.lines().count() == 2 && err.is_empty(),
        "{out} {err}"
    );
    // the fault is gone (the fail point fired its three times): the failed job, run again, renders on
    // the same worker with its attempts and errors cleared; a job that succeeded has nothing to run again
    let (ok, out, err) = cluster.cli(&["retry", &poisoned]);
    assert!(
        ok && out.contains("queued") && out.contains("1 task(s) queued again"),
        "{out} {err}"
    );
    let retried = wait_state(
        &cluster,
        &poisoned,
        pb::JobState::Succeeded,
        Duration::from_secs(60),
    )
    .await;
    assert!(retried.error.is_empty(), "{retried:?}");
    assert_eq!(retried.tasks[0].attempts, 1, "{retried:?}");
    assert!(retried.tasks[0].error.is_empty(), "{retried:?}");
    assert!(
        retried.tasks[0].worker_id.starts_with("only"),
        "{retried:?}"
    );
    let (ok, _, err) = cluster.cli(&["retry", &good]);
    assert!(
        !ok && err.contains("succeeded: there is nothing to run again"),
        "{err}"
    );
}

/// A keep-going batch (`submit --batch --keep-going`) renders around a task that fails for good: content 1's
/// input (tubingen: the tasks are labelled by their files' names) cannot be rendered (a fail point on the one worker, firing once: the tasks are leased in order) and
/// the job allows one attempt. Its other tasks render; the job fails naming that task; `--wait --output`
/// still writes the two results; and `retry`, while the job's results stay, runs only that task, which (the
/// fault gone) renders.
#[tokio::test(flavor = "multi_thread")]
async fn a_keep_going_batch_renders_around_its_failed_task_and_retry_runs_only_that() {
    let mut cluster = Cluster::start(10.0, 0.3);
    cluster.add_worker_with_env("only", &[("FAILPOINTS", "task-input=1*return(tubingen x)")]);
    wait_registered(&cluster, 1).await;
    let output = cluster.dir.path().join("out");
    let (contents, style) = (
        ["tubingen.jpg", "chelsea.png", "coffee.png"],
        "starry_night.jpg",
    );
    let mut args: Vec<String> = ["submit", "--batch", "--keep-going", "--max-attempts", "1"]
        .map(String::from)
        .to_vec();
    for content in contents {
        args.extend(["--content".into(), path(content)]);
    }
    args.extend(["--style".into(), path(style)]);
    args.extend(["--size", "32", "--iterations", "2", "--wait", "--output"].map(String::from));
    args.push(output.display().to_string());
    let (ok, out, err) = cluster.cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        !ok && err.contains(" failed: 1 of 3 tasks failed (2 rendered")
            && err.contains(
                "task 0 (tubingen x starry_night): content: tubingen x cannot be rendered"
            ),
        "{out} {err}"
    );
    // and before it, the failed task's last attempt's log: its worker's lines, how it ended
    assert!(
        err.contains("task 0 (tubingen x starry_night), its last attempt's log:\nattempt 1\tonly#")
            && err.contains("\tfailed on its input: content: tubingen x cannot be rendered")
            && err.contains(" INFO rendering label=tubingen x starry_night"),
        "{err}"
    );
    let job_id = out.trim();
    let written = file_names(&output);
    assert_eq!(
        written,
        [
            "001_chelsea_x_starry_night.png",
            "002_coffee_x_starry_night.png"
        ]
    );
    let mut client = cluster.client().await;
    let failed = job(&mut client, job_id).await;
    let states: Vec<i32> = failed.tasks.iter().map(|t| t.state).collect();
    use pb::TaskState::{Failed, Succeeded};
    assert_eq!(
        states,
        [Failed as i32, Succeeded as i32, Succeeded as i32],
        "{failed:?}"
    );
    let (ok, out, err) = cluster.cli(&["status", job_id]);
    assert!(
        ok && out.contains("failed\t2/3 tasks, 1 failed\t1 of 3"),
        "{out} {err}"
    );
    let (ok, out, err) = cluster.cli(&["retry", job_id]);
    assert!(ok && out.contains("1 task(s) queued again"), "{out} {err}");
    let retried = wait_state(
        &cluster,
        job_id,
        pb::JobState::Succeeded,
        Duration::from_secs(60),
    )
    .await;
    for i in [1, 2] {
        assert_eq!(retried.tasks[i].result, failed.tasks[i].result, "kept");
        assert_eq!(retried.tasks[i].attempts, 1, "not run again");
    }
    assert!(!retried.tasks[0].result.is_empty() && retried.tasks[0].error.is_empty());
}

/// An image damaged in the disk blob store (its file cut short: a disk's fault) is found when it is served:
/// the download ends DATA_LOSS saying so, and the copy is deleted, so the image is no longer held and its
/// next upload stores it again. An upload of an image whose file there is of another size replaces it.
#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_stored_image_is_deleted_when_served_and_stored_again_by_its_next_upload() {
    let cluster = Cluster::start(10.0, 0.5);
    let client = cluster.client().await;
    let png = std::fs::read(shared_image("chelsea.png")).unwrap();
    let upload = |data: Vec<u8>| {
        let mut rpc = client.rpc();
        async move {
            let parts = vec![pb::UploadImageRequest {
                part: Some(pb::upload_image_request::Part::Data(data)),
            }];
            let uploaded = rpc.upload_image(tokio_stream::iter(parts)).await;
            uploaded.unwrap().into_inner().sha256
        }
    };
    let download = |sha256: String| {
        let mut rpc = client.rpc();
        async move {
            let chunks = rpc.download_result(pb::DownloadRequest { sha256 }).await?;
            stylefarm_proto::chunks_bytes(chunks.into_inner(), 1 << 30).await
        }
    };
    let hash = upload(png.clone()).await;
    let file = cluster.data_dir.join("blobs").join(&hash[..2]).join(&hash);
    std::fs::write(&file, &png[..100]).unwrap();
    let err = download(hash.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(
        err.message().starts_with(&format!(
            "image {hash}: the stored copy is damaged (100 bytes that hash to "
        )) && err
            .message()
            .ends_with("; deleted: upload the image again (submit it again), then retry"),
        "{err:?}"
    );
    assert!(!file.exists());
    let held = client
        .rpc()
        .find_images(pb::FindImagesRequest {
            sha256: vec![hash.clone()],
        })
        .await
        .unwrap()
        .into_inner()
        .held;
    assert!(held.is_empty(), "{held:?}");
    assert_eq!(upload(png.clone()).await, hash);
    assert_eq!(download(hash.clone()).await.unwrap(), png);
    // cut short again: an upload of it (a client that does not ask first) writes it whole
    std::fs::write(&file, &png[..100]).unwrap();
    assert_eq!(upload(png.clone()).await, hash);
    assert_eq!(std::fs::read(&file).unwrap(), png);
}

/// A batch that fails without --keep-going: `submit --wait --output` writes none of its results (the job
/// failed), and says how many were rendered and how to write them.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_batch_s_wait_says_how_to_fetch_its_rendered_results() {
    let mut cluster = Cluster::start(10.0, 0.3);
    // one worker leases them in order: the third fails
    cluster.add_worker_with_env(
        "only",
        &[("FAILPOINTS", "task-input=2*off->1*return(tubingen x)")],
    );
    wait_registered(&cluster, 1).await;
    let output = cluster.dir.path().join("out");
    let mut args: Vec<String> = ["submit", "--batch", "--max-attempts", "1"]
        .map(String::from)
        .to_vec();
    for content in ["chelsea.png", "coffee.png", "tubingen.jpg"] {
        args.extend(["--content".into(), path(content)]);
    }
    args.extend(["--style".into(), path("starry_night.jpg")]);
    args.extend(["--size", "32", "--iterations", "2", "--wait", "--output"].map(String::from));
    args.push(output.display().to_string());
    let (ok, out, err) = cluster.cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let job_id = out.trim();
    assert!(!ok && !output.exists(), "{out} {err}");
    assert!(
        err.contains(&format!(
            "2 of its 3 results were rendered: `stylefarm fetch {job_id} -o {}` writes its results",
            output.display()
        )),
        "{err}"
    );
}

/// A farm job whose image came out worse than it began (L-BFGS overshooting in its first of 2 iterations
/// at 64 px, as in render.rs) succeeds, and says so: `submit --wait` prints the engine's warning for the
/// task, `status` notes the job and lists the warning under the task. One of 3 iterations says nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_farm_render_that_ends_worse_than_it_began_succeeds_with_its_warning() {
    let mut cluster = Cluster::start(10.0, 0.3);
    cluster.add_worker("w");
    wait_registered(&cluster, 1).await;
    let warning =
        "the objective ended above where the scale began: its image is worse than its start";
    let render = |iterations: &str| {
        let args = [
            "submit",
            "--content",
            &path("tubingen.jpg"),
            "--style",
            &path("starry_night.jpg"),
            "--size",
            "64",
            "--iterations",
            iterations,
            "--wait",
        ];
        let (ok, out, err) = cluster.cli(&args);
        assert!(ok, "{out} {err}");
        let (ok, status, status_err) = cluster.cli(&["status", out.trim()]);
        assert!(ok, "{status_err}");
        (err, status)
    };
    let (err, status) = render("2");
    assert!(
        err.contains(&format!("task 0 (render) warning: {warning}")),
        "{err}"
    );
    assert!(err.contains("task 0 (render) succeeded"), "{err}");
    let lines: Vec<&str> = status.lines().collect();
    assert!(
        lines[0].ends_with("1 task(s) rendered with warnings"),
        "{status}"
    );
    assert!(lines
        .iter()
        .any(|l| l.trim_start().starts_with(&format!("warning: {warning}"))));
    let (err, status) = render("3");
    assert!(
        !err.contains("warning") && !status.contains("warning"),
        "{err} {status}"
    );
}

/// The photos that a keep-going batch left out at its submit stay with the job: `status` counts them and
/// says each with why, `list` counts them, `watch` fails at the job's end saying so (as `submit --wait`
/// and `local` do), and `fetch` writes the results and points to `status`. A photo that is also the style
/// is not left out: the job is refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_keep_going_batch_s_photos_left_out_at_its_submit_stay_with_the_job() {
    let mut cluster = Cluster::start(10.0, 0.3);
    cluster.add_worker("only");
    let bad = cluster.dir.path().join("notes.png");
    std::fs::write(&bad, b"not an image").unwrap();
    let bad = bad.display().to_string();
    let args = [
        "submit",
        "--batch",
        "--keep-going",
        "--content",
        &bad,
        "--content",
    ];
    let (ok, out, err) = cluster.cli(
        &[
            &args[..],
            &[&path("chelsea.png"), "--style", &path("starry_night.jpg")],
            &["--size", "32", "--iterations", "2"],
        ]
        .concat(),
    );
    assert!(ok, "{out} {err}");
    assert!(
        err.contains(&format!("left out: {bad}: not an image")),
        "{err}"
    );
    // the photo and the style; the file left out is not counted on the coordinator
    assert!(err.contains("2 image(s) uploaded\n"), "{err}");
    let id = out.trim();
    let done = wait_succeeded(&cluster, id).await;
    assert_eq!(done.tasks.len(), 1);
    assert_eq!(
        done.spec.unwrap().left_out,
        [format!("{bad}: not an image (unknown format)")]
    );
    let note = "succeeded\t1/1 tasks\t1 content image(s) left out at its submit";
    let (ok, out, err) = cluster.cli(&["status", id]);
    assert!(ok && out.contains(note), "{out} {err}");
    assert!(
        out.contains(&format!(
            "\n  left out: {bad}: not an image (unknown format)\n"
        )),
        "{out}"
    );
    let (ok, out, err) = cluster.cli(&["list"]);
    assert!(ok && out.contains(note), "{out} {err}");
    let (ok, _, err) = cluster.cli(&["watch", id]);
    assert!(
        !ok && err.contains(&format!(
            "job {id} succeeded: the others rendered, but 1 content image(s) were left out at its \
             submit (the first: {bad}: not an image"
        )),
        "{err}"
    );
    let results = cluster.dir.path().join("results");
    let (ok, out, err) = cluster.cli(&["fetch", id, "-o", results.to_str().unwrap()]);
    assert!(ok && out.lines().count() == 1, "{out} {err}");
    assert!(
        err.contains("the job left out 1 content image(s) at its submit (stylefarm status"),
        "{err}"
    );
    // a photo that is also the style is every task's input: not left out, the job refused naming it
    let (ok, out, err) = cluster.cli(
        &[
            &args[..],
            &[&path("chelsea.png"), "--style", &bad],
            &["--size", "32", "--iterations", "2"],
        ]
        .concat(),
    );
    assert!(
        !ok && !err.contains("panicked") && err.contains(&format!("{bad}: not an image")),
        "{out} {err}"
    );
}

/// A keep-going batch's task cancelled alone (`cancel JOB --task N`) before it ran: the job (submitted
/// paused) renders the others once resumed and ends cancelled, their results kept, and `status` counts it;
/// `retry JOB --task N` renders it alone and the job succeeds. Refused, each naming why: an index the job
/// has no task at (`tasks`), a task that did not fail nor was cancelled, `--task` with two jobs, and a job
/// that is not keep-going.
#[tokio::test(flavor = "multi_thread")]
async fn a_keep_going_batch_s_task_is_cancelled_and_run_again_alone() {
    let mut cluster = Cluster::start(10.0, 0.3);
    cluster.add_worker("only");
    wait_registered(&cluster, 1).await;
    let mut args: Vec<String> = ["submit", "--batch", "--keep-going", "--paused"]
        .map(String::from)
        .to_vec();
    for content in ["chelsea.png", "coffee.png", "tubingen.jpg"] {
        args.extend(["--content".into(), path(content)]);
    }
    args.extend(["--style".into(), path("starry_night.jpg")]);
    args.extend(["--size", "32", "--iterations", "2"].map(String::from));
    let (ok, out, err) = cluster.cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{out} {err}");
    let job_id = out.trim().to_string();
    // nothing of a job that has not ended to run again: said so (it said "0 task(s) queued again")
    let (ok, out, err) = cluster.cli(&["retry", &job_id]);
    assert_eq!(
        out,
        format!(
            "{job_id}\tqueued\tno task queued again: none of its tasks has failed or been cancelled\n"
        ),
        "{err}"
    );
    assert!(ok);
    let (ok, out, err) = cluster.cli(&["cancel", &job_id, "--task", "1", "--task", "7"]);
    assert!(
        !ok && err.contains("tasks: job ") && err.contains("has no task 7: its 3 task(s)"),
        "{out} {err}"
    );
    let (ok, out, err) = cluster.cli(&["cancel", &job_id, "--task", "1"]);
    assert_eq!(
        out,
        format!("{job_id}\tqueued\t1 task(s) cancelled\n"),
        "{err}"
    );
    assert!(ok);
    let (ok, out, err) = cluster.cli(&["resume", &job_id]);
    assert!(ok, "{out} {err}");
    let cancelled = wait_state(
        &cluster,
        &job_id,
        pb::JobState::Cancelled,
        Duration::from_secs(60),
    )
    .await;
    use pb::TaskState::{Cancelled, Succeeded};
    let states: Vec<i32> = cancelled.tasks.iter().map(|t| t.state).collect();
    assert_eq!(
        states,
        [Succeeded as i32, Cancelled as i32, Succeeded as i32]
    );
    let (ok, out, err) = cluster.cli(&["status", &job_id]);
    assert!(
        ok && out.contains("cancelled\t2/3 tasks, 1 cancelled\t1 of 3 tasks cancelled (2 rendered"),
        "{out} {err}"
    );
    let (ok, out, err) = cluster.cli(&["retry", &job_id, "--task", "0"]);
    assert!(
        !ok && err.contains(" (succeeded): only a failed or cancelled task runs again"),
        "{out} {err}"
    );
    let (ok, out, err) = cluster.cli(&["retry", &job_id, "other", "--task", "1"]);
    assert!(
        !ok && err.contains("--task: the tasks of one job; 2 jobs given"),
        "{out} {err}"
    );
    let (ok, out, err) = cluster.cli(&["retry", &job_id, "--task", "1"]);
    assert!(
        ok && out.contains("queued\t1 task(s) queued again"),
        "{out} {err}"
    );
    let done = wait_state(
        &cluster,
        &job_id,
        pb::JobState::Succeeded,
        Duration::from_secs(60),
    )
    .await;
    for i in [0, 2] {
        assert_eq!(done.tasks[i].result, cancelled.tasks[i].result, "kept");
        assert_eq!(done.tasks[i].attempts, 1, "not run again");
    }
    assert!(!done.tasks[1].result.is_empty());
    // a batch that is not keep-going: its tasks end together
    let paused = [
        x_starry("chelsea.png", 32, 2),
        vec!["--batch".into(), "--paused".into()],
    ]
    .concat();
    let (ok, out, err) = cluster.cli(
        &[vec!["submit".to_string()], paused]
            .concat()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(ok, "{out} {err}");
    let other = out.trim().to_string();
    let (ok, out, err) = cluster.cli(&["cancel", &other, "--task", "0"]);
    assert!(!ok && err.contains("is not keep-going"), "{out} {err}");
    let (ok, out, err) = cluster.cli(&["cancel", &other]);
    assert_eq!(out, format!("{other}\tcancelled\n"), "{err}");
    assert!(ok);
}

/// A job of more tasks than the watch has a bar each for (17 variants): `--wait` says each failed task as it
/// fails (its bar, one among many, is gone once it ends), and the job's end names it as before.
#[tokio::test(flavor = "multi_thread")]
async fn waiting_for_a_job_of_many_tasks_says_each_that_fails() {
    let mut cluster = Cluster::start(10.0, 0.3);
    cluster.add_worker_with_env("only", &[("FAILPOINTS", "task-input=return(seed=3)")]);
    wait_registered(&cluster, 1).await;
    let seeds: Vec<String> = (1..=17).map(|i| i.to_string()).collect();
    let mut args: Vec<String> = ["submit", "--sweep", &format!("seed={}", seeds.join(","))]
        .map(String::from)
        .to_vec();
    args.extend(tubingen_x_starry(32, 1));
    // a seed is read by a noise init (the content's is not seeded)
    args.extend(
        [
            "--init",
            "noise",
            "--keep-going",
            "--max-attempts",
            "1",
            "--wait",
        ]
        .map(String::from),
    );
    let (ok, out, err) = cluster.cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        !ok && err.contains(" failed: 1 of 17 tasks failed (16 rendered"),
        "{out} {err}"
    );
    assert_eq!(
        err.matches("task 2 (seed=3) failed: content: seed=3 cannot be rendered")
            .count(),
        1,
        "{err}"
    );
}

/// A keep-going sweep (`submit --sweep --keep-going`) makes its contact sheet around a variant that fails for
/// good (seed=3's, by a fail point on the one worker; the job allows one attempt). The variants are leased
/// in order, so the failure is the last task to end: its report is what starts the sheet. `--wait --output`
/// writes the two rendered variants and the sheet, whose failed cell is grey, and fails naming the failed
/// variant; `retry` runs only that variant (failing again here), keeps the others' results and makes the
/// sheet again. (The retried variant rendering and the job succeeding: the scheduler's unit test.)
#[tokio::test(flavor = "multi_thread")]
async fn a_keep_going_sweep_makes_its_sheet_around_a_failed_variant() {
    let mut cluster = Cluster::start(10.0, 0.3);
    cluster.add_worker_with_env("only", &[("FAILPOINTS", "task-input=return(seed=3)")]);
    wait_registered(&cluster, 1).await;
    let output = cluster.dir.path().join("out");
    let mut args: Vec<String> = ["submit", "--sweep", "seed=1,2,3", "--keep-going"]
        .map(String::from)
        .to_vec();
    args.extend(tubingen_x_starry(32, 2));
    args.extend(
        [
            "--init",
            "noise",
            "--max-attempts",
            "1",
            "--wait",
            "--output",
        ]
        .map(String::from),
    );
    args.push(output.display().to_string());
    let (ok, out, err) = cluster.cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        !ok && err.contains(" failed: 1 of 3 tasks failed (2 rendered")
            && err.contains("task 2 (seed=3): content: seed=3 cannot be rendered"),
        "{out} {err}"
    );
    let job_id = out.trim();
    let written = file_names(&output);
    assert_eq!(
        written,
        ["000_seed=1.png", "001_seed=2.png", "contact-sheet.png"]
    );
    // the failed variant's cell: grey, the size of a rendered one
    let sheet = image::open(output.join("contact-sheet.png"))
        .unwrap()
        .to_rgb8();
    let cell = image::open(output.join("000_seed=1.png")).unwrap();
    let grey = sheet.pixels().filter(|p| p.0 == [128, 128, 128]).count() as u32;
    assert!(
        grey >= cell.width() * cell.height() / 2,
        "{grey} grey pixels in a {}x{} sheet of {}x{} cells",
        sheet.width(),
        sheet.height(),
        cell.width(),
        cell.height()
    );
    let mut client = cluster.client().await;
    let failed = job(&mut client, job_id).await;
    assert!(!failed.contact_sheet.is_empty());
    let (ok, out, err) = cluster.cli(&["retry", job_id]);
    assert!(ok && out.contains("1 task(s) queued again"), "{out} {err}");
    let injected = |n: usize| {
        let log = cluster.workers[0].log_text();
        async move { (log.matches("seed=3 cannot be rendered").count() >= n).then_some(()) }
    };
    wait_for(
        "the variant's second failure",
        Duration::from_secs(60),
        || injected(2),
    )
    .await;
    let again = wait_state(
        &cluster,
        job_id,
        pb::JobState::Failed,
        Duration::from_secs(60),
    )
    .await;
    for i in [0, 1] {
        assert_eq!(again.tasks[i].result, failed.tasks[i].result, "kept");
        assert_eq!(again.tasks[i].attempts, 1, "not run again");
    }
    assert_eq!(again.tasks[2].attempts, 1, "run again, from no attempts");
    assert!(!again.contact_sheet.is_empty(), "the sheet made again");
}

/// A worker whose engine cannot be had again (a render panics, the device probe fails, and the weights are
/// gone when it reloads) stops leasing and exits non-zero with the reason; its task goes back to the queue.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_cannot_render_any_more_leaves_with_the_reason() {
    let mut cluster = Cluster::start(10.0, 0.3);
    let weights = cluster.dir.path().join("vgg19.safetensors");
    std::os::unix::fs::symlink(
        stylefarm_tests::repo()
            .join(".stylefarm/vgg19.safetensors")
            .canonicalize()
            .unwrap(),
        &weights,
    )
    .unwrap();
    cluster.add_worker_with_env(
        "doomed",
        &[
            ("STYLEFARM_WEIGHTS", weights.to_str().unwrap()),
            ("FAILPOINTS", "engine-render=panic;engine-probe=return"),
        ],
    );
    wait_registered(&cluster, 1).await;
    std::fs::remove_file(&weights).unwrap();
    let args = tubingen_x_starry(32, 2);
    let job_id = submit(
        &cluster,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let status = wait_for("the worker to exit", Duration::from_secs(60), || {
        let status = cluster.workers[0].child.try_wait().unwrap();
        async move { status }
    })
    .await;
    assert_eq!(status.code(), Some(1), "{}", cluster.workers[0].log_text());
    let log = cluster.workers[0].log_text();
    assert!(
        log.contains("cannot render any more") && log.contains("reloading failed"),
        "{log}"
    );
    let mut client = cluster.client().await;
    let s = job(&mut client, &job_id).await;
    assert!(
        is(&s, pb::JobState::Queued) || is(&s, pb::JobState::Running),
        "the task waits for another worker: {s:?}"
    );
    assert!(s.tasks[0].error.contains("panicked"), "{s:?}");
}

/// `stylefarm workers` lists the workers: the busy one with its device and the task it renders (the job is
/// this client's), the idle one with its tags; an idle worker killed goes silent within seconds (its lease
/// poll dropped), a busy one once its lease lapses.
#[tokio::test(flavor = "multi_thread")]
async fn workers_lists_each_worker_with_its_health_and_task() {
    let mut cluster = Cluster::start(2.0, 0.3);
    cluster.add_worker("plain");
    cluster.add_worker_with_env("big", &[("STYLEFARM_WORKER_TAGS", "gpu,a100")]);
    wait_registered(&cluster, 2).await;
    let job_id = submit(&cluster, &tubingen_x_starry(48, 200));
    wait_iteration(&cluster, &job_id, 2).await;
    let (ok, out, err) = cluster.cli(&["workers"]);
    assert!(ok, "{err}");
    let lines: Vec<Vec<&str>> = out.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(lines.len(), 2, "{out}");
    let busy = &lines[0];
    assert_eq!(busy[1], "busy", "busy first: {out}");
    assert_eq!(busy[2], "cpu", "{out}");
    assert!(busy[6].starts_with(&format!("{job_id}/0 ")), "{out}");
    let idle = &lines[1];
    let mut tags: Vec<&str> = idle[4].split(',').collect();
    tags.sort();
    let expected = if idle[0].starts_with("big#") {
        vec!["a100", "gpu"]
    } else {
        vec!["-"]
    };
    assert_eq!((idle[1], tags, idle[6]), ("idle", expected, ""), "{out}");
    let busy_name = busy[0].split('#').next().unwrap().to_string();
    let index = if busy_name == "plain" { 0 } else { 1 };
    // the idle worker killed: silent 6 s after its poll (which waits 10 s) dropped with its connection,
    // not idle for the minute it stays live for planning
    cluster.workers[1 - index].kill();
    let idle_name = idle[0].split('#').next().unwrap().to_string();
    goes_silent(&cluster, &idle_name, Duration::from_secs(9)).await;
    // the busy worker killed: silent once its lease (2 s) lapses, and no longer busy
    cluster.workers[index].kill();
    goes_silent(&cluster, &busy_name, Duration::from_secs(30)).await;
}

/// Waits until `stylefarm workers` lists worker `name` silent, for at most `within`.
async fn goes_silent(cluster: &Cluster, name: &str, within: Duration) {
    let what = format!("the killed worker {name} to go silent");
    wait_for(&what, within, || async {
        let (_, out, _) = cluster.cli(&["workers"]);
        out.lines()
            .any(|l| l.starts_with(&format!("{name}#")) && l.contains("\tsilent\t"))
            .then_some(())
    })
    .await;
}

/// `stylefarm drain` takes a worker out of rotation: its running task finishes, the next job waits (saying
/// why) and is not leased, `workers` shows it draining then drained, the metrics count it drained, not
/// live, and it stays drained across the coordinator's restart; `undrain` puts it back and the job renders.
/// An unknown name is refused naming it.
#[tokio::test(flavor = "multi_thread")]
async fn a_drained_worker_finishes_its_task_takes_no_other_until_undrained() {
    let mut cluster = Cluster::new(10.0, 0.3, "embedded");
    cluster.coordinator_args = vec!["--metrics-listen".into(), "127.0.0.1:0".into()];
    cluster.start_coordinator();
    let metrics = metrics_addr(cluster.coordinator.as_ref().unwrap()).await;
    cluster.add_worker("w1");
    wait_registered(&cluster, 1).await;
    // long enough to be running still when `workers` is asked
    let first = submit(&cluster, &tubingen_x_starry(48, 200));
    wait_iteration(&cluster, &first, 2).await;
    let (ok, out, err) = cluster.cli(&["drain", "w1"]);
    assert!(ok && out == "w1\tdrained\n", "{out} {err}");
    let (ok, out, _) = cluster.cli(&["drain", "w1#1"]);
    assert!(ok && out == "w1\talready drained\n", "{out}");
    let (_, out, _) = cluster.cli(&["workers"]);
    assert!(out.starts_with("w1#1\tdraining\t"), "{out}");
    let scraped = scrape(&metrics).await;
    let workers =
        |state: &str| metric_value(&scraped, &format!("stylefarm_workers{{state=\"{state}\"}}"));
    assert_eq!(
        (workers("live"), workers("drained")),
        (Some(0.0), Some(1.0)),
        "{scraped}"
    );
    let next = submit(&cluster, &tubingen_x_starry(32, 2));
    let done = wait_succeeded(&cluster, &first).await;
    assert_eq!(done.tasks[0].attempts, 1, "not stopped: {done:?}");
    let says_drained = |client: RenderClient, what: &'static str| {
        let next = next.clone();
        async move {
            let drained = |s: &pb::JobStatus| s.waiting.contains("may take it are drained");
            wait_job(&client, &next, what, Duration::from_secs(30), drained).await
        }
    };
    let mut client = cluster.client().await;
    says_drained(
        client.clone(),
        "the next job to say that its workers are drained",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let waiting = job(&mut client, &next).await;
    assert!(
        is(&waiting, pb::JobState::Queued) && waiting.tasks[0].attempts == 0,
        "{waiting:?}"
    );
    let (_, out, _) = cluster.cli(&["workers"]);
    assert!(out.starts_with("w1#1\tdrained\t"), "{out}");
    // the drain is stored: the coordinator killed and started again still has w1 drained
    cluster.coordinator.as_mut().unwrap().kill();
    cluster.start_coordinator();
    let mut client = cluster.client().await;
    says_drained(client.clone(), "the restarted coordinator to say so").await;
    let log = cluster.coordinator.as_ref().unwrap().log_text();
    assert!(
        log.contains("workers drained") && log.contains("w1"),
        "{log}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(job(&mut client, &next).await.tasks[0].attempts, 0);
    let (ok, _, err) = cluster.cli(&["undrain", "nobody"]);
    assert!(
        !ok && err.contains("worker 'nobody': no worker of that name"),
        "{err}"
    );
    let (ok, out, err) = cluster.cli(&["undrain", "w1"]);
    assert!(ok && out == "w1\tundrained\n", "{out} {err}");
    wait_state(
        &cluster,
        &next,
        pb::JobState::Succeeded,
        Duration::from_secs(60),
    )
    .await;
}

/// `local` whose only worker cannot render any more (a render panics, the device probe and the reload
/// fail) exits non-zero with the worker's reason, instead of waiting for a worker forever.
#[test]
fn local_exits_with_the_reason_once_every_worker_has_left() {
    let dir = tempfile::tempdir().unwrap();
    let mut local = stylefarm_tests::stylefarm()
        .args(["local", "--workers", "1", "-o"])
        .arg(dir.path().join("out.png"))
        .args(x_starry("chelsea.png", 32, 2))
        .env(
            "FAILPOINTS",
            "engine-render=panic;engine-probe=return;engine-reload=return",
        )
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // it used to wait for a worker for good: a bound, far above the few seconds it takes, kills it
    stylefarm_tests::wait_exit(
        &mut local,
        Duration::from_secs(300),
        "local did not exit with no worker left",
    );
    let out = local.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("every worker left the farm, the job unfinished: cannot render any more")
            && err.contains("reloading failed: device: the weights are gone (injected)"),
        "{err}"
    );
    assert!(!dir.path().join("out.png").exists());
}

/// `local`'s workers share one process: the first report of an input error fails the job, where a farm
/// waits for a second worker's word (`local --workers 1` used to render it three times).
#[test]
fn local_fails_an_input_error_at_its_first_report() {
    let dir = tempfile::tempdir().unwrap();
    let out = stylefarm_tests::stylefarm()
        .args(["local", "--workers", "2", "-o"])
        .arg(dir.path().join("out.png"))
        .args(x_starry("chelsea.png", 32, 2))
        .env("FAILPOINTS", "task-input=return(render)")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("failed with the same non-retryable error on worker local-")
            && err.contains(": content: render cannot be rendered (injected)"),
        "{err}"
    );
    assert_eq!(err.matches("kind=Permanent").count(), 1, "{err}");
    assert!(err.contains("attempt 1\t"), "{err}");
    assert!(!dir.path().join("out.png").exists());
}

/// `local` stopped by Ctrl-C (SIGINT) mid-render exits 130 (128 + SIGINT, as a shell reports a process
/// that Ctrl-C ended) saying so, and its temporary data dir (the job's state and every image of it) is
/// removed, not left in /tmp.
#[test]
fn local_stopped_mid_render_removes_its_data_dir() {
    let (dir, mut local) = local_rendering(x_starry("chelsea.png", 64, 5000), &[]);
    let (tmp, err_path) = (dir.path().join("tmp"), dir.path().join("local.err"));
    let data_dir = local_data_dir_once_rendering(&mut local, &tmp, &err_path);
    let _ = std::process::Command::new("kill")
        .args(["-INT", &local.id().to_string()])
        .status();
    let status = stylefarm_tests::wait_exit(
        &mut local,
        Duration::from_secs(90),
        "local did not stop after SIGINT",
    );
    let err = std::fs::read_to_string(&err_path).unwrap();
    assert_eq!(status.code(), Some(130), "{status:?}: {err}");
    assert!(err.contains("interrupted: the job unfinished"), "{err}");
    assert!(!data_dir.exists(), "{} left behind", data_dir.display());
}

/// A keep-going batch of a folder leaves out the files that are not images after all (a cut-off JPEG, text
/// named .png), images too small for VGG19 at its size, and broken links, saying so at once, renders the others, writes them, and fails at the end naming the first
/// left out; without --keep-going, the job is refused whole before anything renders, naming each.
#[test]
fn a_keep_going_batch_leaves_out_the_files_it_cannot_decode() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    let good = std::fs::read(stylefarm_tests::shared_image("chelsea.png")).unwrap();
    std::fs::write(photos.join("a.png"), &good).unwrap();
    let jpeg = std::fs::read(stylefarm_tests::shared_image("tubingen.jpg")).unwrap();
    std::fs::write(photos.join("b.jpg"), &jpeg[..jpeg.len() / 2]).unwrap();
    std::fs::write(photos.join("c.png"), b"not an image").unwrap();
    // too thin for VGG19 at --size 32 (32 x 1 px), and a link to a photo that is gone
    image::RgbImage::new(320, 10)
        .save(photos.join("d.png"))
        .unwrap();
    std::os::unix::fs::symlink(dir.path().join("gone.jpg"), photos.join("e.jpg")).unwrap();
    let local = |keep_going: bool| {
        let out = dir.path().join(format!("out-{keep_going}"));
        let mut command = stylefarm_tests::stylefarm();
        command
            .args(["local", "--workers", "1", "--batch", "-o"])
            .arg(&out)
            .arg("--content")
            .arg(&photos)
            .args(["--style", &path("starry_night.jpg")])
            .args(["--size", "32", "--iterations", "2"]);
        if keep_going {
            command.arg("--keep-going");
        }
        let done = command.output().unwrap();
        (
            done.status.code(),
            String::from_utf8_lossy(&done.stderr).into_owned(),
            out,
        )
    };
    let (code, err, out) = local(true);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("left out: ")
            && err.contains("b.jpg: cannot decode image")
            && err.contains("c.png: not an image")
            && err.contains("d.png (320 x 10 px) becomes 32 x 1 px at size 32; VGG19 needs")
            && err.contains("e.jpg")
            && err.contains("the others rendered, but 4 content image(s) were left out"),
        "{err}"
    );
    assert_eq!(stylefarm_tests::file_names(&out).len(), 1, "{err}");
    // without it, refused naming each, not the first alone
    let (code, err, out) = local(false);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(
            "contents: 4 content image(s) cannot be rendered (--keep-going leaves them out"
        ) && err.contains("b.jpg: cannot decode image")
            && err.contains("c.png: not an image")
            && err.contains("d.png (320 x 10 px) becomes 32 x 1 px")
            && err.contains("e.jpg: cannot read"),
        "{err}"
    );
    assert!(!out.exists(), "{err}");
}

/// `local` interrupted mid-batch writes the results of the tasks that rendered, says how many, and exits
/// 143 (a folder of 1000 photos stopped at the 999th keeps 998).
#[test]
fn local_interrupted_mid_batch_writes_the_results_rendered() {
    let dir = tempfile::tempdir().unwrap();
    let (out, err_path) = (dir.path().join("out"), dir.path().join("local.err"));
    let mut local = stylefarm_tests::stylefarm()
        .args(["local", "--workers", "1", "--batch", "-o"])
        .arg(&out)
        .args([
            "--content",
            &path("tubingen.jpg"),
            "--content",
            &path("chelsea.png"),
        ])
        .args(["--style", &path("starry_night.jpg")])
        .args(["--size", "32", "--iterations", "150"])
        .env("STYLEFARM_LOG", "info")
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    // the first task over, the second rendering
    let err = text_once_with(&err_path, "task over");
    assert!(err.contains("task over"), "{err}");
    let err = stopped_local(
        &mut local,
        &err_path,
        Duration::from_secs(90),
        "local did not stop after SIGTERM",
    );
    assert!(
        err.contains("interrupted: the job unfinished, the results of 1 of its 2 tasks written"),
        "{err}"
    );
    assert_eq!(stylefarm_tests::file_names(&out).len(), 1, "{err}");
}

/// `local` interrupted twice mid-render (an impatient Ctrl-C) exits with 143 (128 + SIGTERM), saying so, not by a
/// segmentation fault: its engine thread may still render when the process ends, and libtorch's static
/// objects must not be torn down under it. The same signal twice at once (`timeout -s INT`, which also
/// signals the process group) is one interrupt.
#[test]
fn local_interrupted_twice_mid_render_exits_cleanly() {
    // iterations of seconds (1024 px), for the second interrupt to come while the render runs
    let (dir, mut local) = local_rendering(
        x_starry("chelsea.png", 1024, 5000),
        &[("STYLEFARM_LOG", "info")],
    );
    let (tmp, err_path) = (dir.path().join("tmp"), dir.path().join("local.err"));
    let data_dir = local_data_dir_once_rendering(&mut local, &tmp, &err_path);
    let stderr_with = |what: &str| text_once_with(&err_path, what);
    let err = stderr_with("inputs ready");
    assert!(err.contains("inputs ready"), "{err}");
    std::thread::sleep(Duration::from_secs(1));
    // twice at once (one kill of two signals, as `timeout` sends them): one interrupt
    let pid = local.id().to_string();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid, &pid])
        .status();
    let err = stderr_with("interrupt again not to wait");
    assert!(err.contains("interrupt again not to wait"), "{err}");
    std::thread::sleep(Duration::from_millis(400));
    let echo = std::fs::read_to_string(&err_path).unwrap();
    assert!(
        !echo.contains("interrupted again"),
        "an echo taken for a second interrupt: {echo}"
    );
    let err = stopped_local(
        &mut local,
        &err_path,
        Duration::from_secs(60),
        "local did not stop after a second SIGTERM",
    );
    assert!(err.contains("interrupted: the job unfinished"), "{err}");
    assert!(!data_dir.exists(), "{} left behind", data_dir.display());
}

/// `local` interrupted while a render does not stop (it sleeps in the engine, fail point `engine-render`)
/// says that it waits for the render, and a second SIGTERM stops it at once, its data dir removed.
#[test]
fn local_interrupted_twice_does_not_wait_for_the_renders() {
    let (dir, mut local) = local_rendering(
        x_starry("chelsea.png", 32, 2),
        &[
            ("FAILPOINTS", "engine-render=sleep(600000)"),
            ("STYLEFARM_LOG", "info"),
        ],
    );
    let (tmp, err_path) = (dir.path().join("tmp"), dir.path().join("local.err"));
    let data_dir = local_data_dir_once_rendering(&mut local, &tmp, &err_path);
    let stderr_with = |what: &str| text_once_with(&err_path, what);
    // its task's inputs downloaded, the engine thread about to render
    let err = stderr_with("inputs ready");
    assert!(err.contains("inputs ready"), "{err}");
    std::thread::sleep(Duration::from_millis(500));
    terminate(&local);
    // waiting for the render, and saying so
    let err = stderr_with("interrupt again not to wait");
    assert!(local.try_wait().unwrap().is_none(), "{err}");
    assert!(
        err.contains("interrupted: stopping the renders (at most 60 s"),
        "{err}"
    );
    // past the first's echo (an interrupt within 50 ms of the one before is its echo)
    std::thread::sleep(Duration::from_millis(100));
    let err = stopped_local(
        &mut local,
        &err_path,
        Duration::from_secs(20),
        "local did not stop at a second SIGTERM",
    );
    assert!(
        err.contains("interrupted again: not waiting for the renders to stop")
            && err.contains("interrupted: the job unfinished"),
        "{err}"
    );
    assert!(!data_dir.exists(), "{} left behind", data_dir.display());
}

/// `local --workers 1` of `args` (and `env`) to `out.png` in a temporary directory, which it returns: its
/// `TMPDIR` is `tmp` there, its stderr `local.err`.
fn local_rendering(
    args: Vec<String>,
    env: &[(&str, &str)],
) -> (tempfile::TempDir, std::process::Child) {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let local = stylefarm_tests::stylefarm()
        .args(["local", "--workers", "1", "-o"])
        .arg(dir.path().join("out.png"))
        .args(args)
        .env("TMPDIR", &tmp)
        .envs(env.iter().copied())
        .stderr(std::fs::File::create(dir.path().join("local.err")).unwrap())
        .spawn()
        .unwrap();
    (dir, local)
}

/// The text of the file at `path` (a process's stderr) once it holds `what`, or after 120 s (the caller's
/// assertion then shows what it holds).
fn text_once_with(path: &std::path::Path, what: &str) -> String {
    let since = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(what) || since.elapsed() > Duration::from_secs(120) {
            break text;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The data dir that `local` (started with `TMPDIR=tmp`) made in `tmp`, once it has rendered for 3 s.
fn local_data_dir_once_rendering(
    local: &mut std::process::Child,
    tmp: &std::path::Path,
    err_path: &std::path::Path,
) -> std::path::PathBuf {
    let started = Instant::now();
    let data_dir = loop {
        let made = std::fs::read_dir(tmp)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.join("state.redb").exists());
        let err = std::fs::read_to_string(err_path).unwrap_or_default();
        match made {
            Some(d) if started.elapsed() > Duration::from_secs(3) => break d,
            _ if started.elapsed() > Duration::from_secs(120) => {
                local.kill().unwrap();
                panic!("no data dir in {}: {err}", tmp.display());
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    assert!(local.try_wait().unwrap().is_none(), "still rendering");
    data_dir
}

/// Sends `local` SIGTERM and waits up to `within` for it to exit (else panics saying `what`): it exits
/// 143; returns its stderr, the file `err_path`.
fn stopped_local(
    local: &mut std::process::Child,
    err_path: &std::path::Path,
    within: Duration,
    what: &str,
) -> String {
    terminate(local);
    let status = stylefarm_tests::wait_exit(local, within, what);
    let err = std::fs::read_to_string(err_path).unwrap();
    // as a shell reports a process that SIGTERM ended (Ctrl-C's SIGINT: 130)
    assert_eq!(status.code(), Some(143), "{status:?}: {err}");
    err
}

/// Sends SIGTERM to `child`, as Ctrl-C interrupts it.
fn terminate(child: &std::process::Child) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
}

/// `local` whose result cannot be written once rendered (its output's folder removed meanwhile) keeps its
/// temporary data dir and says how to have the result: a coordinator started on it serves the job to
/// `fetch`.
#[tokio::test(flavor = "multi_thread")]
async fn local_whose_result_cannot_be_written_keeps_it_for_a_coordinator_to_serve() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("tmp");
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&tmp).unwrap();
    std::fs::create_dir(&out_dir).unwrap();
    let err_path = dir.path().join("local.err");
    let mut local = stylefarm_tests::stylefarm()
        .args(["local", "--workers", "1", "-o"])
        .arg(out_dir.join("out.png"))
        .args(x_starry("chelsea.png", 64, 60))
        .env("TMPDIR", &tmp)
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    // rendering (its data dir made): the output's folder goes
    wait_for("local's data dir", Duration::from_secs(120), || async {
        let made = std::fs::read_dir(&tmp)
            .unwrap()
            .any(|e| e.unwrap().path().join("state.redb").exists());
        made.then_some(())
    })
    .await;
    std::fs::remove_dir(&out_dir).unwrap();
    let status = tokio::task::spawn_blocking(move || local.wait())
        .await
        .unwrap()
        .unwrap();
    let err = std::fs::read_to_string(&err_path).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("fetching the results of job job-"), "{err}");
    let kept = err
        .split("the results are kept in ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .unwrap_or_else(|| panic!("{err}"));
    let job_id = err
        .split("stylefarm fetch ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("{err}"));
    // as it says: a coordinator on the data dir, and fetch
    let mut cluster = Cluster::new(10.0, 0.5, "embedded");
    cluster.data_dir = kept.into();
    cluster.start_coordinator();
    let fetched = dir.path().join("fetched.png");
    let (ok, _, err) = cluster.cli(&["fetch", job_id, "-o", fetched.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(
        image::image_dimensions(&fetched).unwrap().0,
        64,
        "the render's size"
    );
    std::fs::remove_dir_all(kept).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn health_says_serving_and_reflection_lists_the_services() {
    let cluster = Cluster::start(10.0, 0.5);
    let _ = cluster.client().await;
    let channel = tonic::transport::Channel::from_shared(cluster.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in [
        "",
        "stylefarm.v1.RenderService",
        "stylefarm.v1.WorkerService",
    ] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap();
        assert_eq!(
            status.into_inner().status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service}"
        );
    }

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(channel);
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("{reply:?}")
    };
    let names: HashSet<String> = list.service.into_iter().map(|s| s.name).collect();
    for name in [
        "stylefarm.v1.RenderService",
        "stylefarm.v1.WorkerService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(name), "{name} not in {names:?}");
    }
}

/// The seam measure of a tiled result, and its size.
fn seams(path: &std::path::Path, tile: u32, overlap: u32) -> (f64, (u32, u32)) {
    use stylefarm_core::tiling::{seam_measure, TileGrid, TileSizing, Tiling};
    let img = image::open(path).unwrap().to_rgb8();
    let grid = TileGrid::new(
        img.width(),
        img.height(),
        Tiling {
            tile_size: tile,
            overlap,
            exact: false,
            sizing: TileSizing::Fixed,
        },
    );
    assert!(grid.len() > 1);
    (seam_measure(&img, &grid).unwrap(), img.dimensions())
}

/// Without --tile-size each later scale is planned when it starts, for the device memory the live workers
/// reported (issue 10): whole where its render fits the smallest, as `render` would; tiles of that
/// memory otherwise.
#[tokio::test(flavor = "multi_thread")]
async fn tiles_are_planned_from_the_workers_device_memory() {
    let mut cluster = Cluster::start(10.0, 1.0);
    cluster.add_worker_with_env("large", &[("STYLEFARM_DEVICE_MEMORY", "16GiB")]);
    wait_registered(&cluster, 1).await;
    let args = [
        "--content",
        &path("tubingen.jpg"),
        "--style",
        &path("starry_night.jpg"),
        "--tiled",
        "--size",
        "640",
        "--iterations",
        "1",
    ];
    let render = |cluster: &Cluster, name: &str| {
        let out = cluster.dir.path().join(format!("{name}.png"));
        let (ok, stdout, err) = cluster.cli(
            &[
                &["submit"],
                &args[..],
                &["--wait", "-o", out.to_str().unwrap()],
            ]
            .concat(),
        );
        assert!(ok, "{err}");
        let size = image::image_dimensions(&out).unwrap();
        (stdout.trim().to_string(), size)
    };
    let planned = |status: &pb::JobStatus| -> Vec<(u32, u32)> {
        status
            .tasks
            .iter()
            .filter_map(|t| t.tile.as_ref())
            .map(|t| (t.width, t.height))
            .collect()
    };
    // 16 GiB: the 640 x 480 scale (0.79 GB estimated: its one iteration makes no L-BFGS history) fits: one
    // task, the whole canvas
    let (id, size) = render(&cluster, "whole");
    assert_eq!(size, (640, 480));
    let status = job(&mut cluster.client().await, &id).await;
    assert_eq!(planned(&status), [(640, 480)], "{:?}", status.tasks);
    let coordinator = cluster.coordinator.as_ref().unwrap().log_text();
    assert!(
        coordinator.contains("memory_bytes=17179869184"),
        "{coordinator}"
    );

    // a worker with 2600 MiB joins: 640 x 480 does not fit it beside the 2 GiB kept aside (0.85 of 552 MiB
    // usable), so tiles of at least 512 px; two of them, one for each worker
    cluster.add_worker_with_env("small", &[("STYLEFARM_DEVICE_MEMORY", "2600MiB")]);
    wait_registered(&cluster, 2).await;
    let (id, size) = render(&cluster, "tiles");
    assert_eq!(size, (640, 480));
    let status = job(&mut cluster.client().await, &id).await;
    assert_eq!(
        planned(&status),
        [(512, 480), (512, 480)],
        "{:?}",
        status.tasks
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tiled_render_on_two_workers_has_no_seams_and_survives_a_killed_worker() {
    let mut cluster = Cluster::start(3.0, 0.3);
    cluster.add_worker("w1");
    cluster.add_worker("w2");
    wait_registered(&cluster, 2).await;
    let common = [
        "--content",
        &path("tubingen.jpg"),
        "--style",
        &path("starry_night.jpg"),
        "--tiled",
        "--size",
        "384",
        "--tile-size",
        "192",
        "--overlap",
        "64",
        "--scale-iterations",
        "8,4",
    ];
    // undisturbed, on two workers: 384 x 288 = one 192-px task, then 3 x 2 tiles of 192 px (seam measure
    // 0.98 with 8,4 iterations; at 512 px in 256-px tiles, 0.95, and 0.97 with 16,8, in twice the time)
    let out = cluster.dir.path().join("tiled.png");
    let (ok, stdout, err) = cluster.cli(
        &[
            &["submit"],
            &common[..],
            &[
                "--request-id",
                "undisturbed",
                "--wait",
                "-o",
                out.to_str().unwrap(),
            ],
        ]
        .concat(),
    );
    assert!(ok, "{err}");
    let mut client = cluster.client().await;
    let status = job(&mut client, stdout.trim()).await;
    assert_eq!(status.tasks.len(), 1 + 6);
    assert_eq!((status.scales, status.scale_results.len()), (2, 2));
    let workers: HashSet<&str> = status.tasks.iter().map(|t| t.worker_id.as_str()).collect();
    assert_eq!(workers.len(), 2, "both workers rendered tiles: {workers:?}");
    let (measure, size) = seams(&out, 192, 64);
    assert_eq!(size, (384, 288));
    assert!(measure <= 1.10, "seam measure {measure}");
    let style_cached = cluster
        .workers
        .iter()
        .map(|w| w.log_text().matches("style_cached=true").count())
        .sum::<usize>();
    assert!(
        style_cached >= 4,
        "tiles reuse the scale's style targets: {style_cached} of 6"
    );

    // w1 killed in the middle of a tile: the tile is rendered again (by w2 or a new worker), the pixels
    // are the same
    let disturbed = submit(
        &cluster,
        &[&common[..], &["--request-id", "disturbed"]].concat(),
    );
    let client = cluster.client().await;
    wait_for(
        "a tile to be rendering on w1",
        Duration::from_secs(120),
        || {
            let mut client = client.clone();
            let id = disturbed.clone();
            async move {
                let s = job(&mut client, &id).await;
                s.tasks
                    .iter()
                    .any(|t| {
                        t.tile.is_some()
                            && t.state == pb::TaskState::Running as i32
                            && t.worker_id.starts_with("w1")
                            // past its preparation, 3 of its 4 iterations to go (about 1.5 s)
                            && iteration(t) >= 1
                    })
                    .then_some(())
            }
        },
    )
    .await;
    cluster.workers[0].kill();
    cluster.add_worker("survivor");
    let status = wait_state(
        &cluster,
        &disturbed,
        pb::JobState::Succeeded,
        Duration::from_secs(240),
    )
    .await;
    assert!(
        status
            .tasks
            .iter()
            .any(|t| t.tile.is_some() && t.attempts == 2),
        "the killed tile ran again"
    );
    let undisturbed = job(&mut client.clone(), stdout.trim()).await;
    assert_eq!(
        status.result, undisturbed.result,
        "same spec, same pixels (sha256)"
    );
}

/// The objective of an image against tubingen x starry_night at its own size (`stylefarm render
/// --evaluate`): (style loss, total loss).
fn losses(cluster: &Cluster, image: &std::path::Path) -> (f64, f64) {
    let (ok, out, err) = cluster.cli(&[
        "render",
        "--content",
        &path("tubingen.jpg"),
        "--style",
        &path("starry_night.jpg"),
        "--device",
        "cpu",
        "--evaluate",
        image.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    (
        v["style_loss"].as_f64().unwrap(),
        v["total_loss"].as_f64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exact_tiled_render_reaches_the_style_loss_of_an_untiled_one() {
    let mut cluster = Cluster::start(3.0, 0.3);
    cluster.add_worker("w1");
    wait_registered(&cluster, 1).await;
    let images = [
        "--content",
        &path("tubingen.jpg"),
        "--style",
        &path("starry_night.jpg"),
    ];
    // 30 iterations at the second scale: L-BFGS's first steps there overshoot and recover (the style loss
    // went 130M, 324M, 49M, 40M, 29M, 15M in six), so where the first ones end depends on float rounding
    // (the worker's one libtorch thread against two: 25M against 15M after six for the same exact render;
    // after 20, 3.17M exact in 256-px blocks against 2.94M untiled); after 30 both are past it (2.0914M
    // against 2.0912M)
    let schedule = ["--size", "256", "--scale-iterations", "12,30"];
    // exact mode: scale 1 (128 px) whole, scale 2 (256 x 192) one task evaluated in two 256-px blocks
    // (192 px and 64 px wide, with 32 px of halo)
    let exact = cluster.dir.path().join("exact.png");
    let (ok, stdout, err) = cluster.cli(
        &[
            &["submit"],
            &images[..],
            &schedule[..],
            &[
                "--tiled",
                "--exact",
                "--tile-size",
                "256",
                "--overlap",
                "64",
                // two scales, where a 256-px tile would hold the first
                "--scales",
                "2",
            ],
            &["--wait", "-o", exact.to_str().unwrap()],
        ]
        .concat(),
    );
    assert!(ok, "{err}");
    let status = job(&mut cluster.client().await, stdout.trim()).await;
    assert_eq!(status.tasks.len(), 2, "one task per scale");
    assert_eq!((status.scales, status.scale_results.len()), (2, 2));
    let last = status.tasks[1].tile.as_ref().expect("a tile task");
    assert!(last.exact);
    assert_eq!((last.width, last.height, last.tiles), (256, 192, 1));
    assert!(
        cluster.workers[0]
            .log_text()
            .contains("exact: the whole canvas, in blocks block=256"),
        "the worker evaluated the canvas in blocks"
    );
    // the same schedule, untiled, in one process
    let untiled = cluster.dir.path().join("untiled.png");
    let (ok, _, err) = cluster.cli(
        &[
            &["render"],
            &images[..],
            &schedule[..],
            &["--scales", "2", "--device", "cpu", "--progress", "none"],
            &["-o", untiled.to_str().unwrap()],
        ]
        .concat(),
    );
    assert!(ok, "{err}");
    // not worse than the untiled render (the issue's target: within 10%); lower is fine (the scales are
    // handed over as 8-bit images, which moves a short schedule's end point either way)
    let (tiled, whole) = (losses(&cluster, &exact), losses(&cluster, &untiled));
    eprintln!("(style, total) loss: exact tiled {tiled:.4?}, untiled {whole:.4?}");
    assert!(
        tiled.0 <= 1.10 * whole.0 && tiled.1 <= 1.10 * whole.1,
        "exact tiled {tiled:.4?} vs untiled {whole:.4?}"
    );
}

/// Exact mode over two workers: a later scale is cut into two shards (bands of block rows) that the
/// workers optimize together, adding up each evaluation's Gram matrices and shared gradient rows through
/// the coordinator; with Adam, the pasted bands are what one worker's exact render of the same job gives.
/// With L-BFGS the shards also add up each iteration's dot products: its render is compared with one
/// worker's in tests/shards.rs (L-BFGS' first iterations carry rounding too far for a pixel comparison
/// after 6: max 18, mean 0.9 levels here); here it runs as two shards and succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn two_workers_share_an_exact_scale_and_render_what_one_worker_renders() {
    let mut cluster = Cluster::start(3.0, 0.3);
    cluster.add_worker_with_env("w1", &[("STYLEFARM_WORKER_TAGS", "solo")]);
    cluster.add_worker("w2");
    wait_registered(&cluster, 2).await;
    let render = |name: &str, scale_iterations: &str, extra: &[&str]| {
        let out = cluster.dir.path().join(name);
        let job = exact_x_starry(scale_iterations);
        let job: Vec<&str> = job.iter().map(String::as_str).collect();
        let (ok, stdout, err) = cluster.cli(
            &[
                &["submit"][..],
                &job,
                extra,
                &["--wait", "-o", out.to_str().unwrap()],
            ]
            .concat(),
        );
        assert!(ok, "{err}");
        (
            stdout.trim().to_string(),
            image::open(&out).unwrap().to_rgb8(),
        )
    };
    // both workers may take it: scale 2 (192 x 144 in 128-px blocks) is two shards
    let adam = "6,3";
    let (sharded_id, sharded) = render("sharded.png", adam, &["--optimizer", "adam"]);
    let status = job(&mut cluster.client().await, &sharded_id).await;
    assert_eq!(
        status.tasks.len(),
        3,
        "scale 1 whole, scale 2 in two shards"
    );
    let shards: Vec<_> = status.tasks[1..]
        .iter()
        .map(|t| t.tile.expect("a shard"))
        .collect();
    for (i, s) in shards.iter().enumerate() {
        assert!(s.exact && s.tiles == 2 && s.tile == i as u32, "{s:?}");
        assert_eq!((s.x, s.width), (0, 192));
    }
    // 64-px block rows (128-px blocks, 32 px of halo): 1 and 2 of the 3
    assert_eq!((shards[0].y, shards[0].height, shards[1].y), (0, 64, 64));
    let workers: HashSet<_> = status.tasks[1..]
        .iter()
        .map(|t| t.worker_id.clone())
        .collect();
    assert_eq!(workers.len(), 2, "each worker renders a shard: {workers:?}");
    for w in &cluster.workers {
        assert!(w.log_text().contains("exact: a shard of the canvas"));
    }
    // only w1 may take it: scale 2 is one task, the whole canvas in blocks
    let (solo_id, solo) = render(
        "solo.png",
        adam,
        &["--optimizer", "adam", "--worker-tag", "solo"],
    );
    let status = job(&mut cluster.client().await, &solo_id).await;
    assert_eq!(status.tasks.len(), 2);
    assert_eq!(status.tasks[1].tile.as_ref().map(|t| t.tiles), Some(1));
    let (max, mean) = pixel_difference(sharded.as_raw(), solo.as_raw());
    eprintln!("two shards against one worker: max {max}, mean {mean:.4} levels");
    assert!(max <= 2 && mean < 0.01, "max {max}, mean {mean}");
    // L-BFGS (the default): two shards again, one a worker; two iterations exchange its dot products
    let (lbfgs_id, _) = render("lbfgs.png", "4,2", &[]);
    let status = job(&mut cluster.client().await, &lbfgs_id).await;
    assert_eq!(
        status.tasks.len(),
        3,
        "scale 1 whole, scale 2 in two shards"
    );
    let workers: HashSet<_> = status.tasks[1..]
        .iter()
        .map(|t| t.worker_id.clone())
        .collect();
    assert_eq!(workers.len(), 2, "each worker renders a shard: {workers:?}");
}

/// Two workers, and an exact-mode Adam job (192 px, 128-px blocks) whose scale 2 is two shards, both
/// running past their first iterations; `scale_iterations` as `--scale-iterations` says. The cluster, the
/// job's id and its status then.
async fn two_shards_rendering(scale_iterations: &str) -> (Cluster, String, pb::JobStatus) {
    let mut cluster = Cluster::start(2.0, 0.3);
    cluster.add_worker("w1");
    cluster.add_worker("w2");
    wait_registered(&cluster, 2).await;
    let id = submit(&cluster, &two_shards_x_starry(scale_iterations));
    let client = cluster.client().await;
    let status = wait_for(
        "the shards to be rendering",
        Duration::from_secs(120),
        || {
            let mut client = client.clone();
            let id = id.clone();
            async move {
                let s = job(&mut client, &id).await;
                (s.tasks.len() == 3
                    && s.tasks[1..]
                        .iter()
                        .all(|t| t.state == pb::TaskState::Running as i32 && iteration(t) >= 3))
                .then_some(s)
            }
        },
    )
    .await;
    (cluster, id, status)
}

/// A shard's worker killed for good, with no worker to take its place: once its lease has expired and a
/// lease period passed without it, the coordinator plans the scale again for the one worker left (one
/// task: the whole canvas in blocks). The shards are cancelled as replaced, saying why, and the job
/// succeeds on the worker left, with no strike against it.
#[tokio::test(flavor = "multi_thread")]
async fn a_scale_whose_shard_worker_is_gone_for_good_is_planned_again_for_the_workers_left() {
    // 6 iterations: the shards are killed past their third, and the whole canvas in 128-px blocks then
    // renders its 6 on the worker left
    let (mut cluster, id, status) = two_shards_rendering("4,6").await;
    let doomed = status.tasks[1].worker_id.clone();
    let index = if doomed.starts_with("w1") { 0 } else { 1 };
    cluster.workers[index].kill();
    let done = wait_state(
        &cluster,
        &id,
        pb::JobState::Succeeded,
        Duration::from_secs(180),
    )
    .await;
    assert_eq!(done.tasks.len(), 4, "scale 1, two shards, then one task");
    for t in &done.tasks[1..3] {
        assert_eq!(t.state, pb::TaskState::Cancelled as i32, "{t:?}");
        assert!(t.replaced, "{t:?}");
        assert!(
            t.error
                .contains("planned again for the 1 worker(s) left of the 2"),
            "{}",
            t.error
        );
    }
    let whole = &done.tasks[3];
    assert_eq!(whole.state, pb::TaskState::Succeeded as i32);
    assert!(!whole.replaced);
    let tile = whole.tile.expect("a task of scale 2");
    assert!(
        tile.exact && tile.tiles == 1 && (tile.width, tile.height) == (192, 144),
        "{tile:?}"
    );
    assert!(
        !whole.worker_id.starts_with(&doomed[..2]),
        "{}",
        whole.worker_id
    );
    let name = |id: &str| id.split('#').next().unwrap_or_default().to_string();
    assert_eq!(
        done.strikes.keys().cloned().collect::<Vec<_>>(),
        vec![name(&doomed)],
        "only the lost lease is a strike"
    );
    let log = cluster.coordinator.as_ref().unwrap().log_text();
    assert!(
        log.contains("scale planned again for the workers left"),
        "{log}"
    );
}

/// A shard's worker killed mid-scale: the other shard's exchange fails once the lost lease ends (a group
/// failure: no strike against its worker, and no attempt), both shards start again on the workers left,
/// and the job succeeds with the scale's shards rendered whole again.
#[tokio::test(flavor = "multi_thread")]
async fn a_shard_whose_worker_is_killed_restarts_its_group() {
    // 6 iterations, the shards killed past their third: a shard waits at its next exchange for its
    // group's sums, so the survivor cannot run ahead of the killed shard; more iterations only lengthen
    // the restarted group's render
    let (mut cluster, id, status) = two_shards_rendering("4,6").await;
    // a spare worker joins (the scale's shards are planned already), then shard 0's worker dies
    cluster.add_worker("w3");
    let doomed = status.tasks[1].worker_id.clone();
    let index = if doomed.starts_with("w1") { 0 } else { 1 };
    cluster.workers[index].kill();
    let done = wait_state(
        &cluster,
        &id,
        pb::JobState::Succeeded,
        Duration::from_secs(180),
    )
    .await;
    // the killed shard's lost lease counts an attempt; the survivor's group failure gave its back
    let attempts: Vec<u32> = done.tasks[1..].iter().map(|t| t.attempts).collect();
    assert_eq!(attempts, [2, 1], "{done:?}");
    for t in &done.tasks[1..] {
        assert!(
            !t.worker_id.starts_with(&doomed[..2]),
            "{} on {}",
            t.index,
            t.worker_id
        );
    }
    // the survivor's shard failed as a group failure, not a strike
    let survivor = &cluster.workers[1 - index];
    let log = survivor.log_text();
    assert!(
        log.contains("failure=Group(") && log.contains("lease ended"),
        "{log}"
    );
    let name = |id: &str| id.split('#').next().unwrap_or_default().to_string();
    assert_eq!(
        done.strikes.keys().cloned().collect::<Vec<_>>(),
        vec![name(&doomed)],
        "only the lost lease is a strike"
    );
}

/// A worker drained while it renders a shard of an exact-mode scale keeps it to the scale's end: the scale
/// is not planned again for the workers left (which would throw away both shards' work), and each shard
/// runs once.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_drained_mid_shard_finishes_it_and_the_scale_is_not_planned_again() {
    // 12 iterations: the shards (past their third) still run once the sleep below is over
    let (cluster, id, status) = two_shards_rendering("4,12").await;
    let drained = status.tasks[1].worker_id.clone();
    let name = drained.split('#').next().unwrap().to_string();
    let (ok, out, err) = cluster.cli(&["drain", &name]);
    assert!(ok && out == format!("{name}\tdrained\n"), "{out} {err}");
    // past two lease periods (2 s each): a scale short of workers is planned again after one
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut client = cluster.client().await;
    let now = job(&mut client, &id).await;
    assert_eq!(now.tasks.len(), 3, "{now:?}");
    // still rendering on the drained worker (else nothing was left to plan again)
    assert_eq!(now.tasks[1].state, pb::TaskState::Running as i32, "{now:?}");
    assert_eq!(now.tasks[1].worker_id, drained, "{now:?}");
    let done = wait_state(
        &cluster,
        &id,
        pb::JobState::Succeeded,
        Duration::from_secs(180),
    )
    .await;
    let attempts: Vec<u32> = done.tasks[1..].iter().map(|t| t.attempts).collect();
    assert_eq!(attempts, [1, 1], "{done:?}");
    assert_eq!(done.tasks[1].worker_id, drained, "{done:?}");
}

/// A stand-in for an older coordinator: it serves only server reflection (and health), with stylefarm.v1
/// less RenderParams.match_colors, CancelJobRequest.tasks and the JobSpec fields `job_spec_lacks`; its URL.
async fn older_coordinator(job_spec_lacks: &'static [&'static str]) -> String {
    use prost::Message;
    let mut set =
        prost_types::FileDescriptorSet::decode(stylefarm_proto::FILE_DESCRIPTOR_SET).unwrap();
    for message in set.file.iter_mut().flat_map(|f| &mut f.message_type) {
        if message.name() == "RenderParams" {
            message.field.retain(|f| f.name() != "match_colors");
        }
        if message.name() == "JobSpec" {
            message
                .field
                .retain(|f| !job_spec_lacks.contains(&f.name()));
        }
        if message.name() == "CancelJobRequest" {
            message.field.retain(|f| f.name() != "tasks");
        }
    }
    let older: &'static [u8] = Box::leak(set.encode_to_vec().into_boxed_slice());
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(older)
        .build_v1()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            // an older coordinator answers health checks, as every version does
            .add_service(tonic_health::server::health_reporter().1)
            .add_service(reflection)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    url
}

/// A client newer than its coordinator: a submit that sets an option the coordinator's descriptors lack is
/// refused before any byte is sent, naming the field, where an older coordinator would drop it and render
/// the job without it; so is a cancel of some of a job's tasks (`--task`), which it would take for a cancel
/// of the whole job. The stand-in coordinator serves only server reflection, with stylefarm.v1 less
/// RenderParams.match_colors and the images' names (JobSpec.content_names, style_names) and those left out
/// (left_out): without the option the CLI goes on to upload (which it does not serve), the batch's names
/// and those left out dropped (they are for people).
#[tokio::test]
async fn a_submit_with_an_option_an_older_coordinator_lacks_is_refused_naming_it() {
    let url = older_coordinator(&["content_names", "style_names", "left_out"]).await;
    // one that knows the names, but not those left out
    let names_url = older_coordinator(&["left_out"]).await;
    let submit = move |url: &str, extra: &[&str]| {
        let out = stylefarm_tests::stylefarm()
            .args(["submit", "--coordinator", url])
            .args(x_starry("chelsea.png", 32, 2))
            .arg("--batch")
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let cancel = move |url: &str, extra: &[&str]| {
        let out = stylefarm_tests::stylefarm()
            .args(["cancel", "--coordinator", url, "job-0123"])
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("notes.png");
    std::fs::write(&bad, b"not an image").unwrap();
    let bad = bad.display().to_string();
    let (((refused, err), (plain, plain_err)), (task_refused, task_err), kept) =
        tokio::task::spawn_blocking(move || {
            let keep_going = ["--keep-going", "--content", &bad];
            (
                (submit(&url, &["--match-colors"]), submit(&url, &[])),
                cancel(&url, &["--task", "1"]),
                [submit(&url, &keep_going), submit(&names_url, &keep_going)],
            )
        })
        .await
        .unwrap();
    // a keep-going batch that left out a photo: those left out are for people too, dropped for a
    // coordinator without them
    for (kept, kept_err) in kept {
        assert!(
            !kept && !kept_err.contains("does not know") && kept_err.contains("Unimplemented"),
            "{kept_err}"
        );
    }
    // cancelling some of a job's tasks: the older coordinator would cancel the whole job
    assert!(!task_refused, "{task_err}");
    assert!(
        task_err.contains("the coordinator does not know CancelJobRequest.tasks (2):"),
        "{task_err}"
    );
    assert!(!refused, "{err}");
    assert!(
        err.contains("the coordinator does not know RenderParams.match_colors (26):")
            && err.contains("upgrade the coordinator"),
        "{err}"
    );
    // the check passed: the upload is what the stand-in does not serve
    assert!(!plain, "{plain_err}");
    assert!(
        !plain_err.contains("does not know") && plain_err.contains("Unimplemented"),
        "{plain_err}"
    );
}

/// A cancel (or retry) of some of a job's tasks is refused, naming why, when the coordinator's fields cannot
/// be read: an older coordinator would take it for a call on the whole job. The stand-in serves server
/// reflection without stylefarm.v1; a cancel of the whole job goes on to call it (which it does not serve).
#[tokio::test]
async fn a_cancel_of_some_tasks_is_refused_when_the_coordinator_s_fields_cannot_be_read() {
    use prost::Message;
    let empty: &'static [u8] = Box::leak(
        prost_types::FileDescriptorSet::default()
            .encode_to_vec()
            .into_boxed_slice(),
    );
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(empty)
        .build_v1()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            // an older coordinator answers health checks, as every version does
            .add_service(tonic_health::server::health_reporter().1)
            .add_service(reflection)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let call = move |args: &[&str]| {
        let out = stylefarm_tests::stylefarm()
            .args(args)
            .args(["--coordinator", &url, "job-0123"])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let ((cancel_ok, cancel_err), (retry_ok, retry_err), (whole_ok, whole_err)) =
        tokio::task::spawn_blocking(move || {
            (
                call(&["cancel", "--task", "1"]),
                call(&["retry", "--task", "1"]),
                call(&["cancel"]),
            )
        })
        .await
        .unwrap();
    assert!(
        !cancel_ok
            && cancel_err.contains(
                "cancelling tasks of job job-0123: refused, as the coordinator's fields could not be read"
            ),
        "{cancel_err}"
    );
    assert!(
        !retry_ok && retry_err.contains("running tasks of job job-0123 again: refused"),
        "{retry_err}"
    );
    assert!(
        !whole_ok && !whole_err.contains("refused") && whole_err.contains("Unimplemented"),
        "{whole_err}"
    );
}

/// A job's images that the coordinator holds already are not uploaded again (FindImages): a batch
/// submitted a second time with a new photo among its old ones uploads that photo alone, and renders.
/// An image never uploaded is not held; a call asking about more than the limit is refused naming sha256.
/// Nor are results downloaded twice: a fetch run again skips the PNG files that hold their result, and
/// downloads one whose file changed. A result that cannot be written does not stop the others.
#[tokio::test(flavor = "multi_thread")]
async fn images_are_not_uploaded_again_nor_results_fetched_twice() {
    use stylefarm_client::JobFiles;
    use stylefarm_core::job::{ImageHash, JobKind};
    let mut cluster = Cluster::start(10.0, 0.5);
    cluster.add_worker("w1");
    let mut client = cluster.client().await;
    let batch = |contents: &[&str]| {
        JobFiles::new(
            JobKind::Batch,
            contents.iter().map(|name| shared_image(name)).collect(),
            vec![shared_image("starry_night.jpg")],
            stylefarm_core::RenderParams {
                size: 48,
                iterations: 2,
                ..Default::default()
            },
        )
    };
    client
        .submit_files(&batch(&["tubingen.jpg"]))
        .await
        .unwrap();
    assert_eq!(client.uploaded(), 2, "the photo and the style");
    let again = client
        .submit_files(&batch(&["tubingen.jpg", "chelsea.png"]))
        .await
        .unwrap();
    assert_eq!(client.uploaded(), 3, "the new photo alone");
    let done = wait_succeeded(&cluster, again.as_str()).await;
    assert_eq!(done.tasks.len(), 2);
    let out = cluster.dir.path().join("results");
    let before = client.downloaded();
    let written = client.fetch(&done, &out).await.unwrap();
    assert_eq!((written.len(), client.downloaded() - before), (2, 2));
    assert_eq!(client.fetch(&done, &out).await.unwrap(), written);
    assert_eq!(client.downloaded() - before, 2, "both there already");
    std::fs::write(&written[0], b"not the result").unwrap();
    client.fetch(&done, &out).await.unwrap();
    assert_eq!(client.downloaded() - before, 3, "the changed file again");
    let bytes = std::fs::read(&written[0]).unwrap();
    assert_eq!(ImageHash::of(&bytes).as_str(), done.tasks[0].result);
    // a result that cannot be written (a folder in its file's place) does not stop the other's
    for file in &written {
        std::fs::remove_file(file).unwrap();
    }
    std::fs::create_dir(&written[0]).unwrap();
    let mut said = Vec::new();
    let fetched = client.fetch_each(&done, &out, |path| said.push(path.to_path_buf()));
    let err = fetched.await.unwrap_err().to_string();
    assert_eq!(said, [written[1].clone()], "each said as it was written");
    assert!(
        err.contains("output: 1 of 2 result(s) could not be written (1 were), the first: "),
        "{err}"
    );
    let bytes = std::fs::read(&written[1]).unwrap();
    assert_eq!(ImageHash::of(&bytes).as_str(), done.tasks[1].result);
    let never = ImageHash::of(b"never uploaded");
    assert!(client
        .find_images(std::slice::from_ref(&never))
        .await
        .unwrap()
        .is_empty());
    let too_many = pb::FindImagesRequest {
        sha256: vec![never.to_string(); stylefarm_proto::MAX_FIND_IMAGES + 1],
    };
    let refused = client.rpc().find_images(too_many).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().starts_with("sha256: "),
        "{}",
        refused.message()
    );
}

/// A single job of tubingen in starry_night's style, 48 px, 2 iterations, as files for `submit_files`.
fn tubingen_x_starry_files() -> stylefarm_client::JobFiles {
    stylefarm_client::JobFiles::new(
        stylefarm_core::job::JobKind::Single,
        vec![shared_image("tubingen.jpg")],
        vec![shared_image("starry_night.jpg")],
        stylefarm_core::RenderParams {
            size: 48,
            iterations: 2,
            ..Default::default()
        },
    )
}

/// A coordinator with the fail point `failpoint` (FAILPOINTS), one worker and a client.
async fn find_images_cluster(failpoint: &str) -> (Cluster, stylefarm_client::FarmClient) {
    let mut cluster = Cluster::new(10.0, 0.5, "embedded");
    cluster.coordinator_env = vec![("FAILPOINTS".into(), format!("{failpoint}=return"))];
    cluster.start_coordinator();
    cluster.add_worker("w1");
    let client = cluster.client().await;
    (cluster, client)
}

/// A coordinator older than FindImages answers it UNIMPLEMENTED (here FAILPOINTS
/// coordinator-find-images-unimplemented): the client takes every image for not held, uploads them all, and
/// the job renders.
#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_without_find_images_gets_every_image_uploaded() {
    let (cluster, mut client) = find_images_cluster("coordinator-find-images-unimplemented").await;
    let job = tubingen_x_starry_files();
    let first = client.submit_files(&job).await.unwrap();
    wait_succeeded(&cluster, first.as_str()).await;
    assert_eq!(client.uploaded(), 2);
    // the same images again: held, but the coordinator cannot say so; uploaded again (a no-op there)
    let photo =
        stylefarm_core::job::ImageHash::of(&std::fs::read(shared_image("tubingen.jpg")).unwrap());
    let held = client.find_images(&[photo]).await.unwrap();
    assert!(held.is_empty(), "{held:?}");
    let again = client.submit_files(&job).await.unwrap();
    assert_eq!(client.uploaded(), 4, "every image uploaded each time");
    wait_succeeded(&cluster, again.as_str()).await;
}

/// An image that FindImages answered as held but that is gone when the job comes (the blob collection
/// deleted it meanwhile; here every image is answered held, FAILPOINTS coordinator-find-images-stale):
/// SubmitJob refuses it as not uploaded, and the client uploads the images it took for held and submits
/// again. The job renders.
#[tokio::test(flavor = "multi_thread")]
async fn an_image_taken_for_held_but_collected_is_uploaded_and_the_job_submitted_again() {
    let (cluster, mut client) = find_images_cluster("coordinator-find-images-stale").await;
    let never = stylefarm_core::job::ImageHash::of(b"never uploaded");
    let held = client
        .find_images(std::slice::from_ref(&never))
        .await
        .unwrap();
    assert!(
        held.contains(&never),
        "the fail point answers every image held"
    );
    let job = tubingen_x_starry_files();
    let id = client.submit_files(&job).await.unwrap();
    assert_eq!(client.uploaded(), 2, "both, after the refusal");
    wait_succeeded(&cluster, id.as_str()).await;
}
