//! The coordinator's status page (`--status-listen`) in a real browser: Debian's headless Chromium driven
//! through chromedriver (WebDriver), against a real coordinator with client tokens and two real workers
//! rendering a tiled job.
//!
//! Needs `chromium` and `chromium-driver` (deploy/test.sh installs them); `CHROMEDRIVER` and `CHROMIUM`
//! name other binaries. `STYLEFARM_SCREENSHOT=FILE` keeps the screenshot (docs/status-page.png was made so).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use stylefarm_tests::{logged_addr, path, submit, wait_for, wait_registered, Cluster};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLIENT_TOKEN: &str = "status-page-token-0123456789";
const WORKER_TOKEN: &str = "status-page-worker-0123456789";
const OTHER_TOKEN: &str = "status-page-other-tenant-0123456789";

/// An HTTP/1.1 response: its status code, its head (status line and headers) and its body.
struct Answer {
    code: u16,
    head: String,
    body: String,
}

/// One HTTP/1.1 request with `headers` (`Host: ADDR` unless they have one) and a form `body` (none when
/// empty).
async fn http(addr: &str, method: &str, target: &str, headers: &[&str], body: &str) -> Answer {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!("{method} {target} HTTP/1.1\r\nConnection: close\r\n");
    if !headers
        .iter()
        .any(|h| h.to_ascii_lowercase().starts_with("host:"))
    {
        request.push_str(&format!("Host: {addr}\r\n"));
    }
    for h in headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    if !body.is_empty() {
        request.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    Answer {
        code: head.split(' ').nth(1).unwrap().parse().unwrap(),
        head: head.to_ascii_lowercase(),
        body: body.to_string(),
    }
}

/// chromedriver on a free port of 127.0.0.1, killed on drop.
struct Chromedriver {
    child: Child,
    url: String,
}

impl Chromedriver {
    fn start() -> Chromedriver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let program = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let child = Command::new(&program)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{program}: {e} (Debian: apt-get install chromium chromium-driver)")
            });
        Chromedriver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// A headless Chromium session, 1280 x 1000, retried while chromedriver starts.
    async fn session(&self) -> Client {
        let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let capabilities = serde_json::json!({
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,1000", "--hide-scrollbars"],
            }
        });
        let serde_json::Value::Object(capabilities) = capabilities else {
            unreachable!()
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        wait_for("a Chromium session", Duration::from_secs(60), || {
            let (connector, capabilities) = (connector.clone(), capabilities.clone());
            async move {
                ClientBuilder::new(connector)
                    .capabilities(capabilities)
                    .connect(&self.url)
                    .await
                    .ok()
            }
        })
        .await
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Evaluates `script` (a function body that returns a value) in the page.
async fn eval(browser: &Client, script: &str) -> serde_json::Value {
    browser.execute(script, Vec::new()).await.unwrap()
}

/// A tiled job on two workers behind client tokens, watched in headless Chromium: the page first asks for the
/// token (the API answers 401 without one and 403 to a worker's token; the login sets an HttpOnly,
/// SameSite=Strict cookie and is refused from another site's page; the page has its Content-Security-Policy;
/// a cancel without the page's CSRF header is refused; another tenant neither sees nor cancels the job);
/// logged in, it shows the job running with the first scale's stitched preview and the second scale's tiles
/// arriving over it, and both workers with their device, memory and health (screenshot taken then); the job's
/// cancel button cancels it, and the page and the API both say cancelled (paused and resumed from its buttons
/// before); its retry button runs it again, keeping the tiles that had succeeded. The running tiles show
/// their workers' previews (`--preview-secs 0.5`), also served to the API.
#[tokio::test(flavor = "multi_thread")]
async fn the_status_page_shows_a_running_tiled_job_and_cancels_it() {
    let mut cluster = Cluster::new(10.0, 0.5, "embedded");
    cluster.coordinator_args = [
        "--status-listen",
        "127.0.0.1:0",
        "--client-token",
        &format!("studio:{CLIENT_TOKEN}"),
        "--client-token",
        &format!("other:{OTHER_TOKEN}"),
        "--worker-token",
        WORKER_TOKEN,
        "--preview-secs",
        "0.5",
    ]
    .map(String::from)
    .into();
    cluster.cli_env = vec![("STYLEFARM_TOKEN".into(), CLIENT_TOKEN.into())];
    cluster.start_coordinator();
    let addr = logged_addr(cluster.coordinator.as_ref().unwrap(), "status page").await;
    let token = [("STYLEFARM_TOKEN", WORKER_TOKEN)];
    cluster.add_worker_with_env("w1", &token);
    cluster.add_worker_with_env("w2", &token);
    wait_registered(&cluster, 2).await;

    // the API without a token, with a worker's, with a client's; the page's headers; the login's cookie,
    // and a login posted from another site's page
    let answer = http(&addr, "GET", "/api/status", &[], "").await;
    assert_eq!(answer.code, 401, "{}", answer.body);
    assert!(
        answer
            .body
            .contains("send the header 'Authorization: Bearer <token>'"),
        "said for HTTP, not gRPC's metadata: {}",
        answer.body
    );
    let worker_auth = format!("Authorization: Bearer {WORKER_TOKEN}");
    let answer = http(&addr, "GET", "/api/status", &[&worker_auth], "").await;
    assert_eq!(answer.code, 403, "{}", answer.body);
    let client_auth = format!("Authorization: Bearer {CLIENT_TOKEN}");
    let answer = http(&addr, "GET", "/api/status", &[&client_auth], "").await;
    assert_eq!(answer.code, 200, "{}", answer.body);
    assert!(
        answer.body.contains("\"tenant\":\"studio\""),
        "{}",
        answer.body
    );
    let page = http(&addr, "GET", "/", &[&client_auth], "").await;
    assert_eq!(page.code, 200, "{}", page.body);
    assert!(
        page.head
            .contains("content-security-policy: default-src 'self'"),
        "{}",
        page.head
    );
    // the login's cookie holds a session id, never the token; the id works until logout
    let form = format!("token={CLIENT_TOKEN}");
    let login = http(&addr, "POST", "/login", &[], &form).await;
    assert_eq!(login.code, 303, "{}", login.body);
    let session = login
        .head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: stylefarm_session="))
        .unwrap_or_else(|| panic!("no session cookie: {}", login.head));
    let (id, attributes) = session.split_once(';').unwrap();
    assert!(
        id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{session}"
    );
    assert_eq!(
        attributes.trim(),
        "path=/; httponly; samesite=strict; max-age=43200"
    );
    assert!(
        !login.head.contains(&CLIENT_TOKEN.to_ascii_lowercase()),
        "{}",
        login.head
    );
    let cookie = format!("Cookie: stylefarm_session={id}");
    let answer = http(&addr, "GET", "/api/status", &[&cookie], "").await;
    assert_eq!(answer.code, 200, "{}", answer.body);
    let logout = http(&addr, "POST", "/logout", &[&cookie], "").await;
    assert_eq!(logout.code, 303, "{}", logout.body);
    assert!(
        logout.head.contains("stylefarm_session=; path=/") && logout.head.contains("max-age=0"),
        "{}",
        logout.head
    );
    let answer = http(&addr, "GET", "/api/status", &[&cookie], "").await;
    assert_eq!(answer.code, 401, "the session ended: {}", answer.body);
    let forged = http(
        &addr,
        "POST",
        "/login",
        &["Sec-Fetch-Site: cross-site"],
        &form,
    )
    .await;
    assert_eq!(forged.code, 403, "{}", forged.body);
    assert!(!forged.head.contains("set-cookie"), "{}", forged.head);

    // scale 1: 128 px whole; scale 2: 256 x 192 cut into 128-px tiles
    let id = submit(
        &cluster,
        &[
            "--content",
            &path("tubingen.jpg"),
            "--style",
            &path("starry_night.jpg"),
            "--tiled",
            "--size",
            "256",
            "--tile-size",
            "128",
            "--overlap",
            "64",
            "--scale-iterations",
            "10,40",
            "--name",
            "a <b>tiled</b> job",
        ],
    );
    // a cancel without the page's header; another tenant neither sees the job nor cancels it
    let cancel = format!("/api/jobs/{id}/cancel");
    let answer = http(&addr, "POST", &cancel, &[&client_auth], "").await;
    assert_eq!(answer.code, 403, "{}", answer.body);
    assert!(answer.body.contains("x-stylefarm-csrf"), "{}", answer.body);
    let other_auth = format!("Authorization: Bearer {OTHER_TOKEN}");
    let answer = http(&addr, "GET", "/api/status", &[&other_auth], "").await;
    assert!(answer.body.contains("\"jobs\":[]"), "{}", answer.body);
    let csrf = "X-Stylefarm-Csrf: 1";
    let answer = http(&addr, "POST", &cancel, &[&other_auth, csrf], "").await;
    assert_eq!(answer.code, 404, "{}", answer.body);

    let driver = Chromedriver::start();
    let browser = driver.session().await;
    let url = format!("http://{addr}/");
    browser.goto(&url).await.unwrap();
    // the login form, then the page
    let field = browser.find(Locator::Css("#token")).await.unwrap();
    field.send_keys(CLIENT_TOKEN).await.unwrap();
    browser
        .find(Locator::Css("#login"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let card = format!("#job-{id}");
    browser
        .wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Css(&card))
        .await
        .unwrap();

    // running at scale 2 with the first scale's preview loaded and at least one tile of scale 2 done
    wait_for(
        "scale 2 under way on the page",
        Duration::from_secs(300),
        || async {
            let seen = eval(
                &browser,
                &format!(
                    "const card = document.querySelector('{card}');
                     const loaded = [...card.querySelectorAll('.previews img')]
                         .filter(i => i.complete && i.naturalWidth > 0);
                     return {{
                       state: card.querySelector('.badge').textContent,
                       preview: [...card.querySelectorAll('figure:not(.mosaic) img')]
                           .some(i => i.complete && i.naturalWidth > 0),
                       done: card.querySelectorAll('.mosaic .tile.succeeded img').length,
                       live: [...card.querySelectorAll('.mosaic .tile.running img.live')]
                           .filter(i => i.complete && i.naturalWidth > 0).length,
                       loaded: loaded.length,
                       tiles: card.querySelectorAll('.mosaic .tile').length,
                     }};"
                ),
            )
            .await;
            assert_ne!(seen["state"], "failed", "{seen}");
            assert_ne!(
                seen["state"], "succeeded",
                "the job ended before it was seen: {seen}"
            );
            (seen["state"] == "running"
                && seen["preview"] == true
                && seen["done"].as_u64() >= Some(1)
                && seen["live"].as_u64() >= Some(1)
                && seen["tiles"].as_u64() >= Some(4))
            .then_some(seen)
        },
    )
    .await;
    // a running tile's latest preview from its worker, through the API: a PNG of the tile's window
    let preview = wait_for(
        "a running tile's preview",
        Duration::from_secs(30),
        || async {
            let answer = http(&addr, "GET", "/api/status", &[&client_auth], "").await;
            let status: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
            let tasks = status["jobs"][0]["tasks"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let running = tasks
                .iter()
                .find(|t| t["state"] == "running" && t["preview_ms"].as_i64() > Some(0))?;
            let target = format!("/api/jobs/{id}/tasks/{}/preview", running["index"]);
            let answer = http(&addr, "GET", &target, &[&client_auth], "").await;
            (answer.code == 200).then_some(answer)
        },
    )
    .await;
    assert!(
        preview.head.contains("content-type: image/png"),
        "{}",
        preview.head
    );
    assert!(preview.body.contains("PNG") && preview.body.contains("IHDR"));
    let answer = http(
        &addr,
        "GET",
        &format!("/api/jobs/{id}/tasks/0/preview"),
        &[&other_auth],
        "",
    )
    .await;
    assert_eq!(answer.code, 404, "another tenant's: {}", answer.body);
    // the first scale's task's log, as text: its attempt, with its worker's lines
    let log = format!("/api/jobs/{id}/tasks/0/log");
    let answer = http(&addr, "GET", &log, &[&client_auth], "").await;
    assert_eq!(answer.code, 200, "{}", answer.body);
    assert!(
        answer.head.contains("content-type: text/plain"),
        "{}",
        answer.head
    );
    let first = answer.body.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("attempt 1\t") && first.ends_with("\tsucceeded"),
        "{}",
        answer.body
    );
    assert!(answer.body.contains(" INFO rendered "), "{}", answer.body);
    let answer = http(&addr, "GET", &log, &[&other_auth], "").await;
    assert_eq!(answer.code, 404, "another tenant's: {}", answer.body);

    // the workers: both, with their device, memory and health
    let workers = browser
        .find(Locator::Css("#workers tbody"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(workers.matches("cpu").count(), 2, "{workers}");
    assert!(workers.contains("MiB of"), "{workers}");
    assert!(
        workers.contains("busy") || workers.contains("idle"),
        "{workers}"
    );
    let screenshot = browser.screenshot().await.unwrap();
    if let Ok(file) = std::env::var("STYLEFARM_SCREENSHOT") {
        std::fs::write(&file, &screenshot).unwrap();
    }
    // the window's viewport: its width, its height less the browser's own bars
    let shot = image::load_from_memory(&screenshot).unwrap();
    assert_eq!(shot.width(), 1280);
    assert!(shot.height() >= 600, "{}", shot.height());

    // pause and resume from the page: a paused badge while paused
    let paused_badge = format!("return !!document.querySelector('{card} .badge.paused');");
    for (action, paused) in [("pause", true), ("resume", false)] {
        browser
            .find(Locator::Css(&format!("{card} button.{action}")))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        wait_for(action, Duration::from_secs(10), || async {
            (eval(&browser, &paused_badge).await == paused).then_some(())
        })
        .await;
    }

    // cancel from the page
    browser
        .find(Locator::Css(&format!("{card} button.cancel")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(
        "the page to say cancelled",
        Duration::from_secs(30),
        || async {
            let state = eval(
                &browser,
                &format!("return document.querySelector('{card} .badge').textContent;"),
            )
            .await;
            (state == "cancelled").then_some(())
        },
    )
    .await;
    // and the API: the job cancelled, none of its tasks left running
    let answer = http(&addr, "GET", "/api/status", &[&client_auth], "").await;
    assert_eq!(answer.code, 200, "{}", answer.body);
    let status: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
    let job = &status["jobs"][0];
    assert_eq!(job["id"], id.as_str(), "{job}");
    assert_eq!(job["name"], "a <b>tiled</b> job", "{job}");
    assert_eq!(job["state"], "cancelled", "{job}");
    // the card shows the name as text, not markup
    assert_eq!(
        eval(
            &browser,
            &format!("return document.querySelector('{card} .name').textContent;"),
        )
        .await,
        "a <b>tiled</b> job"
    );
    assert!(job["counts"].is_object(), "{job}");
    assert_eq!(job["counts"].get("running"), None, "{job}");
    // no cancel button on a finished job
    assert_eq!(
        eval(
            &browser,
            &format!("return document.querySelector('{card} button.cancel').hidden;"),
        )
        .await,
        true
    );

    // its retry button runs it again (refused, and shown so, while its workers are still stopping its
    // tasks); it keeps the tiles that had succeeded
    // scale 1 at least (its stitched image was shown)
    let succeeded = job["counts"]["succeeded"]
        .as_u64()
        .expect("succeeded tasks");
    assert!(succeeded >= 1, "{job}");
    let retry = format!("{card} button.retry");
    wait_for(
        "the page to run the job again",
        Duration::from_secs(30),
        || async {
            let state = eval(
                &browser,
                &format!("return document.querySelector('{card} .badge').textContent;"),
            )
            .await;
            if state != "cancelled" {
                return Some(());
            }
            let button = browser.find(Locator::Css(&retry)).await.unwrap();
            if button.is_enabled().await.unwrap() && button.is_displayed().await.unwrap() {
                button.click().await.unwrap();
            }
            None
        },
    )
    .await;
    let answer = http(&addr, "GET", "/api/status", &[&client_auth], "").await;
    let status: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
    let job = &status["jobs"][0];
    assert!(
        job["state"] == "queued" || job["state"] == "running",
        "{job}"
    );
    assert!(
        job["counts"]["succeeded"]
            .as_u64()
            .expect("succeeded tasks")
            >= succeeded,
        "{job}"
    );
    assert_eq!(job["counts"].get("cancelled"), None, "{job}");
    let hidden =
        |button: &str| format!("return document.querySelector('{card} button.{button}').hidden;");
    wait_for("the buttons to follow", Duration::from_secs(10), || async {
        let cancel_shown = eval(&browser, &hidden("cancel")).await == false;
        let retry_hidden = eval(&browser, &hidden("retry")).await == true;
        (cancel_shown && retry_hidden).then_some(())
    })
    .await;
    browser.close().await.unwrap();
}

/// A keep-going batch's tasks on the page: a queued task has a cancel button, a cancelled one a retry button
/// (POST /api/jobs/{id}/tasks/{index}/{cancel,retry}, with the page's CSRF header: refused without it);
/// pressed, they cancel the task alone and queue it again, and the job's retry button shows while it runs
/// with a task cancelled. A batch that is not keep-going has no task buttons, and the API refuses its tasks
/// alone, naming why. The photo the keep-going one left out at its submit is said on its card and in the
/// JSON. No worker: the jobs are submitted paused.
#[tokio::test(flavor = "multi_thread")]
async fn a_keep_going_batch_s_tasks_are_cancelled_and_run_again_from_the_page() {
    let mut cluster = Cluster::new(10.0, 0.5, "embedded");
    cluster.coordinator_args = ["--status-listen", "127.0.0.1:0"].map(String::from).into();
    cluster.start_coordinator();
    let addr = logged_addr(cluster.coordinator.as_ref().unwrap(), "status page").await;
    let batch = |extra: &[&str]| {
        let mut args = vec!["--batch", "--paused", "--size", "32", "--iterations", "2"];
        args.extend_from_slice(extra);
        let (chelsea, coffee, starry) = (
            path("chelsea.png"),
            path("coffee.png"),
            path("starry_night.jpg"),
        );
        let images = [
            "--content",
            &chelsea,
            "--content",
            &coffee,
            "--style",
            &starry,
        ];
        submit(&cluster, &[&args[..], &images[..]].concat())
    };
    // and a photo that is not one, left out at its submit: its tasks are the others'
    let bad = cluster.dir.path().join("notes.png");
    std::fs::write(&bad, b"not an image").unwrap();
    let id = batch(&["--keep-going", "--content", bad.to_str().unwrap()]);
    let plain = batch(&[]);
    let answer = http(&addr, "GET", "/api/status", &[], "").await;
    assert!(
        answer.body.contains(r#""left_out":[""#)
            && answer
                .body
                .contains("notes.png: not an image (unknown format)\"],\"left_out_count\":1"),
        "{}",
        answer.body
    );
    let task_state = |index: usize| {
        let (addr, id) = (addr.clone(), id.clone());
        async move {
            let answer = http(&addr, "GET", "/api/status", &[], "").await;
            let status: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
            let jobs = status["jobs"].as_array().unwrap();
            let job = jobs.iter().find(|j| j["id"] == id.as_str()).unwrap();
            job["tasks"][index]["state"].as_str().unwrap().to_string()
        }
    };
    let cancel_1 = format!("/api/jobs/{id}/tasks/1/cancel");
    let answer = http(&addr, "POST", &cancel_1, &[], "").await;
    assert_eq!(answer.code, 403, "{}", answer.body);
    assert_eq!(task_state(1).await, "pending");
    let answer = http(
        &addr,
        "POST",
        &format!("/api/jobs/{plain}/tasks/1/cancel"),
        &["X-Stylefarm-Csrf: 1"],
        "",
    )
    .await;
    assert_eq!(answer.code, 400, "{}", answer.body);
    assert!(answer.body.contains("is not keep-going"), "{}", answer.body);
    let answer = http(
        &addr,
        "POST",
        &format!("/api/jobs/{id}/tasks/9/cancel"),
        &["X-Stylefarm-Csrf: 1"],
        "",
    )
    .await;
    assert_eq!(answer.code, 400, "{}", answer.body);
    assert!(answer.body.contains("tasks: job "), "{}", answer.body);

    let driver = Chromedriver::start();
    let browser = driver.session().await;
    browser.goto(&format!("http://{addr}/")).await.unwrap();
    let card = format!("#job-{id}");
    let press = |action: &'static str| {
        let (browser, selector) = (
            browser.clone(),
            format!("{card} button[data-task='1'][data-action='{action}']"),
        );
        async move {
            wait_for(
                &format!("task 1's {action} button"),
                Duration::from_secs(30),
                || async {
                    let button = browser.find(Locator::Css(&selector)).await.ok()?;
                    (button.is_displayed().await.ok()? && button.is_enabled().await.ok()?)
                        .then_some(button)
                },
            )
            .await
            .click()
            .await
            .unwrap();
        }
    };
    let left_out =
        format!("return document.querySelector('{card} details.err summary')?.textContent;");
    wait_for("the photo left out", Duration::from_secs(10), || async {
        let text = eval(&browser, &left_out).await;
        (text.as_str()? == "1 content image(s) left out at its submit").then_some(())
    })
    .await;
    press("cancel").await;
    wait_for(
        "task 1 to be cancelled",
        Duration::from_secs(10),
        || async { (task_state(1).await == "cancelled").then_some(()) },
    )
    .await;
    assert_eq!(task_state(0).await, "pending");
    let head_retry = format!("return document.querySelector('{card} .head button.retry').hidden;");
    wait_for(
        "the job's retry button",
        Duration::from_secs(10),
        || async { (eval(&browser, &head_retry).await == false).then_some(()) },
    )
    .await;
    press("retry").await;
    wait_for(
        "task 1 to be queued again",
        Duration::from_secs(10),
        || async { (task_state(1).await == "pending").then_some(()) },
    )
    .await;
    let plain_buttons =
        format!("return document.querySelectorAll('#job-{plain} button[data-task]').length;");
    assert_eq!(eval(&browser, &plain_buttons).await, 0);
    browser.close().await.unwrap();
}

/// Without tokens, the page answers requests for its IP address, localhost, and the names given with
/// `--status-allowed-host`; another `Host` (a name that a web page's server could point at this address,
/// DNS rebinding) gets 403 naming the flag, for the JSON and the buttons alike.
#[tokio::test(flavor = "multi_thread")]
async fn without_tokens_the_status_page_answers_only_its_addresses_and_allowed_hosts() {
    let mut cluster = Cluster::new(10.0, 0.5, "embedded");
    cluster.coordinator_args = [
        "--status-listen",
        "127.0.0.1:0",
        "--status-allowed-host",
        "farm.example.lan",
    ]
    .map(String::from)
    .into();
    cluster.start_coordinator();
    let addr = logged_addr(cluster.coordinator.as_ref().unwrap(), "status page").await;
    let port = addr.rsplit_once(':').unwrap().1;
    for host in [
        addr.clone(),
        format!("localhost:{port}"),
        format!("Farm.Example.LAN:{port}"),
    ] {
        let answer = http(&addr, "GET", "/api/status", &[&format!("Host: {host}")], "").await;
        assert_eq!(answer.code, 200, "{host}: {}", answer.body);
        assert!(answer.body.contains("\"jobs\":[]"), "{}", answer.body);
    }
    let rebound = format!("Host: rebind.attacker.example:{port}");
    let answer = http(&addr, "GET", "/api/status", &[&rebound], "").await;
    assert_eq!(answer.code, 403, "{}", answer.body);
    assert!(
        answer.body.contains("--status-allowed-host"),
        "{}",
        answer.body
    );
    let cancel = "/api/jobs/job-0123456789abcdef/cancel";
    let answer = http(
        &addr,
        "POST",
        cancel,
        &[&rebound, "X-Stylefarm-Csrf: 1"],
        "",
    )
    .await;
    assert_eq!(answer.code, 403, "{}", answer.body);
}
