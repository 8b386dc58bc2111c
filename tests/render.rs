//! `stylefarm render` end to end: the real binary, the real engine and the VGG19 weights of deploy/setup.sh,
//! on small images from ../shared/data.

use std::path::Path;
use std::process::{Command, Output};

use image::RgbImage;
use serde_json::Value;

use stylefarm_tests::{pixel_difference, shared_image};

fn stylefarm(args: &[&str]) -> Output {
    stylefarm_tests::stylefarm()
        .args(args)
        .env("STYLEFARM_DEVICE", "cpu")
        .output()
        .expect("run stylefarm")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `stylefarm args` whose stdout's reader has left before it wrote (`| head -0`): its output.
fn with_stdout_closed(args: &[&str]) -> Output {
    let mut child = stylefarm_tests::stylefarm()
        .args(args)
        .env("STYLEFARM_DEVICE", "cpu")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run stylefarm");
    drop(child.stdout.take());
    child.wait_with_output().expect("wait for stylefarm")
}

/// A reader of the output that stops early (`stylefarm list | head -1`) ends a command as it ends any Unix
/// tool, by SIGPIPE, not with a panic of its printing; a render with JSON progress renders on without it
/// and writes its image.
#[test]
fn a_reader_that_leaves_early_ends_a_listing_quietly_and_not_a_render() {
    use std::os::unix::process::ExitStatusExt;
    let out = with_stdout_closed(&["weights", "path"]);
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    // 13: SIGPIPE
    assert_eq!(
        out.status.signal(),
        Some(13),
        "{:?} {}",
        out.status,
        stderr(&out)
    );
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out.png");
    let out = with_stdout_closed(&[
        "render",
        "--content",
        shared_image("chelsea.png").to_str().unwrap(),
        "--style",
        shared_image("starry_night.jpg").to_str().unwrap(),
        "--size",
        "32",
        "--iterations",
        "3",
        "--progress",
        "json",
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{:?} {}", out.status, stderr(&out));
    assert!(
        stderr(&out).contains("stdout is closed"),
        "{}",
        stderr(&out)
    );
    assert_eq!(image::open(&output).unwrap().width(), 32);
}

/// `stylefarm render` of `content` in the style of `style` to `output` with `extra` options, which must
/// succeed; its output.
fn render_to(content: &Path, style: &Path, output: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "render",
        "--content",
        content.to_str().unwrap(),
        "--style",
        style.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = stylefarm(&args);
    assert!(out.status.success(), "render failed: {}", stderr(&out));
    out
}

/// Renders tubingen x starry_night with `extra` options and JSON progress; returns the progress lines.
fn render(output: &Path, extra: &[&str]) -> Vec<Value> {
    let (content, style) = (
        shared_image("tubingen.jpg"),
        shared_image("starry_night.jpg"),
    );
    let args = [&["--progress", "json"], extra].concat();
    let out = render_to(&content, &style, output, &args);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// [`render_to`] with JSON progress; the first progress line: iteration 0's losses.
fn first_progress(content: &Path, style: &Path, output: &Path, extra: &[&str]) -> Value {
    let out = render_to(
        content,
        style,
        output,
        &[&["--progress", "json"], extra].concat(),
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().next().expect("a progress line")).unwrap()
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

#[test]
fn style_loss_falls_tenfold_in_50_lbfgs_iterations() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let lines = render(&out, &["--size", "128", "--iterations", "50"]);
    assert_eq!(lines.len(), 51, "iterations 0..=50");
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["iteration"].as_u64(), Some(i as u64));
        let sum = f(line, "content_loss") + f(line, "style_loss") + f(line, "tv_loss");
        assert!(
            (sum - f(line, "total_loss")).abs() <= 1e-5 * f(line, "total_loss"),
            "{line}"
        );
    }
    let (first, last) = (f(&lines[0], "style_loss"), f(&lines[50], "style_loss"));
    assert!(
        last * 10.0 <= first,
        "style loss {first} -> {last}: less than a 10x fall"
    );
    assert!(
        f(&lines[0], "content_loss") == 0.0,
        "init content: no content loss at iteration 0"
    );
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (128, 96));
}

/// A scale whose objective ends above where it began succeeds with a warning saying so (L-BFGS's second
/// evaluation at 64 px steps far past the minimum, 3.3e8 to 4.9e17; the third is back at 3.3e8); one that
/// ends lower says nothing.
#[test]
fn a_render_that_ends_worse_than_it_began_is_said() {
    let dir = tempfile::tempdir().unwrap();
    let (content, style) = (
        shared_image("tubingen.jpg"),
        shared_image("starry_night.jpg"),
    );
    let warned = |iterations: &str| {
        let out = dir.path().join(format!("{iterations}.png"));
        let args = [
            "--size",
            "64",
            "--iterations",
            iterations,
            "--progress",
            "none",
        ];
        let err = stderr(&render_to(&content, &style, &out, &args));
        err.contains(
            "the objective ended above where the scale began: its image is worse than its start",
        )
    };
    assert!(warned("2"));
    assert!(!warned("3"));
}

#[test]
fn seeded_cpu_runs_repeat_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, seed: &str| {
        let out = dir.path().join(name);
        let lines = render(
            &out,
            &[
                "--size",
                "64",
                "--iterations",
                "8",
                "--init",
                "noise",
                "--seed",
                seed,
            ],
        );
        (
            std::fs::read(&out).unwrap(),
            lines.iter().map(|l| f(l, "total_loss")).collect::<Vec<_>>(),
        )
    };
    let (a, la) = run("a.png", "7");
    let (b, lb) = run("b.png", "7");
    let (c, _) = run("c.png", "8");
    assert_eq!(la, lb, "same seed, same losses");
    assert!(a == b, "same seed, same pixels");
    assert!(a != c, "another seed, other pixels");
}

fn chroma(p: [u8; 3]) -> (f64, f64) {
    let [r, g, b] = p.map(f64::from);
    (
        -0.168_736 * r - 0.331_264 * g + 0.5 * b,
        0.5 * r - 0.418_688 * g - 0.081_312 * b,
    )
}

fn mean_chroma_distance(a: &RgbImage, b: &RgbImage) -> f64 {
    let n = (a.width() * a.height()) as f64;
    a.pixels()
        .zip(b.pixels())
        .map(|(p, q)| {
            let ((a1, a2), (b1, b2)) = (chroma(p.0), chroma(q.0));
            (a1 - b1).abs() + (a2 - b2).abs()
        })
        .sum::<f64>()
        / n
}

#[test]
fn original_colors_keep_the_content_chroma() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, kept) = (dir.path().join("plain.png"), dir.path().join("kept.png"));
    render(&plain, &["--size", "96", "--iterations", "20"]);
    render(
        &kept,
        &["--size", "96", "--iterations", "20", "--original-colors"],
    );
    let content = image::open(shared_image("tubingen.jpg")).unwrap().to_rgb8();
    let content = image::imageops::resize(&content, 96, 72, image::imageops::FilterType::Lanczos3);
    let (plain, kept) = (
        image::open(plain).unwrap().to_rgb8(),
        image::open(kept).unwrap().to_rgb8(),
    );
    let (d_plain, d_kept) = (
        mean_chroma_distance(&plain, &content),
        mean_chroma_distance(&kept, &content),
    );
    assert!(
        d_kept < 3.0,
        "chroma distance with --original-colors: {d_kept}"
    );
    assert!(
        d_plain > 3.0 * d_kept,
        "without it the style's colours show: {d_plain} vs {d_kept}"
    );
}

/// Luminance-only transfer takes nothing from the style's colours: the style image and its own luminance (a
/// grey image) give the same pixels, bit for bit on the CPU, where without it they differ; the result has
/// the content's chroma.
#[test]
fn luminance_only_transfer_takes_the_styles_luminance_alone() {
    let dir = tempfile::tempdir().unwrap();
    let grey_style = dir.path().join("grey-starry.png");
    let starry = image::open(shared_image("starry_night.jpg"))
        .unwrap()
        .to_rgb8();
    stylefarm_core::imaging::luminance(&starry)
        .save(&grey_style)
        .unwrap();
    let content = shared_image("tubingen.jpg");
    let run = |style: &Path, extra: &[&str]| {
        render_64(
            dir.path(),
            &content,
            style,
            &[&["--iterations", "10"], extra].concat(),
        )
    };
    let colour = shared_image("starry_night.jpg");
    // two scales: the second starts from the first's luminance (10 iterations: torch.optim.LBFGS without a
    // line search can overshoot on its second step, and a scale of 2 iterations would end there)
    let lum = ["--luminance-only", "--scales", "2"];
    let (from_colour, from_grey) = (run(&colour, &lum), run(&grey_style, &lum));
    assert!(
        from_colour == from_grey,
        "the style's colours changed the result"
    );
    // the style's luminance is matched to the content's first: a darker, flatter style (its levels
    // L -> 0.4 L + 20) renders as the style does, up to the rounding of its levels
    let dim_style = dir.path().join("dim-starry.png");
    image::RgbImage::from_fn(starry.width(), starry.height(), |x, y| {
        image::Rgb(
            starry
                .get_pixel(x, y)
                .0
                .map(|v| (f64::from(v) * 0.4 + 20.0).round() as u8),
        )
    })
    .save(&dim_style)
    .unwrap();
    let from_dim = run(&dim_style, &lum);
    let (max, mean) = pixel_difference(from_colour.as_raw(), from_dim.as_raw());
    // measured: mean 3.9 (max 49) levels matched; 14.4 (max 112) with the style's own luminance
    assert!(
        mean < 8.0,
        "the style's brightness changed the result: max {max}, mean {mean:.3}"
    );
    assert!(
        run(&colour, &[]) != run(&grey_style, &[]),
        "without --luminance-only the colours count"
    );
    let content = image::open(&content).unwrap().to_rgb8();
    let content = image::imageops::resize(&content, 64, 48, image::imageops::FilterType::Lanczos3);
    let distance = mean_chroma_distance(&from_colour, &content);
    assert!(distance < 3.0, "chroma distance: {distance}");
}

#[test]
fn multi_scale_renders_coarse_to_fine_and_writes_jpeg() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jpg");
    let lines = render(
        &out,
        &[
            "--size",
            "96",
            "--scales",
            "2",
            "--scale-iterations",
            "4,3",
            "--optimizer",
            "adam",
        ],
    );
    let per_scale: Vec<(u64, u64, u64)> = lines
        .iter()
        .map(|l| {
            (
                l["scale"].as_u64().unwrap(),
                l["width"].as_u64().unwrap(),
                l["iteration"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(per_scale.first(), Some(&(1, 48, 0)));
    assert_eq!(per_scale.iter().filter(|s| s.0 == 1).count(), 5);
    assert_eq!(per_scale.last(), Some(&(2, 96, 3)));
    // the time left: the end of the first scale still has the second's iterations ahead; the last report
    // has none
    let eta: Vec<f64> = lines.iter().map(|l| f(l, "eta_s")).collect();
    assert!(eta.iter().all(|e| e.is_finite() && *e >= 0.0), "{eta:?}");
    assert!(eta[4] > 0.0 && *eta.last().unwrap() == 0.0, "{eta:?}");
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(
        &bytes[..2],
        &[0xFF, 0xD8],
        "a JPEG by the output's extension"
    );
}

/// `--save-every N` writes the image every N iterations of each scale beside the output, at the scale's
/// size; the image of a scale's last iteration is that scale's result (of the last scale: the output,
/// pixel for pixel). `--save-every 0` writes none.
#[test]
fn snapshots_are_written_every_n_iterations_and_the_last_is_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let names = stylefarm_tests::file_names;
    let out = dir.path().join("out.png");
    render(
        &out,
        &["--size", "64", "--iterations", "4", "--save-every", "2"],
    );
    assert_eq!(names(dir.path()), ["out.png", "out_2.png", "out_4.png"]);
    let output = image::open(&out).unwrap().to_rgb8();
    let last = image::open(dir.path().join("out_4.png")).unwrap().to_rgb8();
    assert_eq!(last, output, "iteration 4 of 4 is the result");
    let second = image::open(dir.path().join("out_2.png")).unwrap().to_rgb8();
    assert_eq!(second.dimensions(), output.dimensions());
    assert!(
        pixel_difference(&second, &output).1 > 0.0,
        "a snapshot of an earlier image"
    );

    // two scales, Adam (its last step's image is evaluated after the loop): each scale's own
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jpg");
    let args = ["--size", "64", "--scales", "2", "--scale-iterations", "4,3"];
    render(
        &out,
        &[&args[..], &["--optimizer", "adam", "--save-every", "2"]].concat(),
    );
    assert_eq!(
        names(dir.path()),
        ["out.jpg", "out_s1_2.jpg", "out_s1_4.jpg", "out_s2_2.jpg"]
    );
    let size = |name: &str| image::image_dimensions(dir.path().join(name)).unwrap();
    assert_eq!((size("out_s1_4.jpg").0, size("out_s2_2.jpg").0), (32, 64));

    // a snapshot that cannot be written (a folder of its name) is said and the render goes on: the
    // output and the other snapshots are written
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    std::fs::create_dir(dir.path().join("out_2.png")).unwrap();
    let (content, style) = (
        shared_image("tubingen.jpg"),
        shared_image("starry_night.jpg"),
    );
    let args = ["--size", "32", "--iterations", "6", "--save-every", "2"];
    let done = render_to(&content, &style, &out, &args);
    let said = stderr(&done);
    assert!(
        said.contains("warning: snapshot ") && said.contains("out_2.png not written"),
        "{said}"
    );
    assert!(!said.contains("snapshots not written"), "one: {said}");
    assert!(out.is_file() && dir.path().join("out_6.png").is_file());

    // 0: none, as neural-style's `-save_iter 0`
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    render(
        &out,
        &["--size", "64", "--iterations", "2", "--save-every", "0"],
    );
    assert_eq!(names(dir.path()), ["out.png"]);
}

/// Iterate averaging (`--avg-decay`, crowsonkb's): the output, and each snapshot, is the bias-corrected
/// moving average of the images that the same render without it goes through (the content it starts from
/// and each step's image, which `--save-every 1` writes in 16 bits), within their rounding; the average
/// is not the last image.
#[test]
fn the_averaged_render_is_the_moving_average_of_its_images() {
    let dir = tempfile::tempdir().unwrap();
    let (content, style) = (
        shared_image("tubingen.jpg"),
        shared_image("starry_night.jpg"),
    );
    let args = [
        "--size",
        "64",
        "--optimizer",
        "adam",
        "--learning-rate",
        "2",
        "--iterations",
        "6",
        "--output-depth",
        "16",
        "--save-every",
        "1",
    ];
    let (plain, averaged) = (dir.path().join("plain.png"), dir.path().join("avg.png"));
    let out = render_to(&content, &style, &plain, &args);
    // its progress where stderr is not a terminal (a log): lines, not a bar; iteration 0 and the last
    let log = stderr(&out);
    assert!(
        log.contains("iteration 0/6  scale 1/1 64x48  loss ") && log.contains("iteration 6/6  "),
        "{log}"
    );
    render_to(
        &content,
        &style,
        &averaged,
        &[&args[..], &["--avg-decay", "0.5"]].concat(),
    );
    // in 0..255 units
    let levels = |path: &Path| -> Vec<f64> {
        let img = image::open(path).unwrap().to_rgb16();
        img.as_raw().iter().map(|&v| f64::from(v) / 257.0).collect()
    };
    let start = stylefarm_core::imaging::resize_longest(
        &stylefarm_core::imaging::load(&content).unwrap(),
        64,
    );
    let mut images = vec![start
        .as_raw()
        .iter()
        .map(|&v| f64::from(v))
        .collect::<Vec<_>>()];
    for k in 1..=6 {
        images.push(levels(&dir.path().join(format!("plain_{k}.png"))));
    }
    let decay: f64 = 0.5;
    for k in [3, 6] {
        let got = levels(&dir.path().join(format!("avg_{k}.png")));
        let (mut most, mut compared) = (0.0f64, 0);
        for (i, &g) in got.iter().enumerate() {
            let values: Vec<f64> = images[..=k].iter().map(|img| img[i]).collect();
            // a value clamped to 0..255 in a saved image is not the one averaged
            if values.iter().any(|&v| v <= 0.0 || v >= 255.0) {
                continue;
            }
            let sum: f64 = (0..=k)
                .map(|j| (1.0 - decay) * decay.powi((k - j) as i32) * values[j])
                .sum();
            most = most.max((g - sum / (1.0 - decay.powi(k as i32 + 1))).abs());
            compared += 1;
        }
        assert!(compared > got.len() * 9 / 10, "{compared} of {}", got.len());
        assert!(most < 0.02, "iteration {k}: {most} levels from the average");
    }
    let (last, output) = (levels(&plain), levels(&averaged));
    assert_eq!(output, levels(&dir.path().join("avg_6.png")));
    let apart = last
        .iter()
        .zip(&output)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(apart > 1.0, "the average is not the last image: {apart}");
}

/// An output that cannot be written whole (here: over the process's file size limit, `ulimit -f`, as a
/// full disk stops it) fails naming the output, not the temporary file it was being written to, and
/// leaves neither behind; the render is kept in the temporary folder where it can be (not here: the limit
/// holds there too).
#[test]
fn an_output_that_cannot_be_written_names_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    // SIGXFSZ ignored (as exec keeps it), so that a write past the limit fails with EFBIG instead
    let script = r#"trap '' XFSZ; ulimit -f 1; exec "$@""#;
    let done = std::process::Command::new("sh")
        .args(["-c", script, "sh"])
        .arg(stylefarm_tests::binary())
        .args(["render", "--size", "64", "--iterations", "1", "-o"])
        .arg(&out)
        .arg("--content")
        .arg(shared_image("tubingen.jpg"))
        .arg("--style")
        .arg(shared_image("starry_night.jpg"))
        .env("OMP_NUM_THREADS", "1")
        .env("TMPDIR", &tmp)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(1), "{err}");
    let line = err.lines().last().unwrap_or_default();
    let too_large = "cannot write: File too large (os error 27)";
    assert!(
        line.starts_with(&format!("error: {}: {too_large}; ", out.display()))
            && line.contains(
                "the rendered image is lost: it could not be kept in the temporary folder"
            )
            && line.ends_with(&format!(".png: {too_large})"))
            && !line.contains(".partial"),
        "{err}"
    );
    assert_eq!(stylefarm_tests::file_names(dir.path()), ["tmp"]);
    assert_eq!(stylefarm_tests::file_names(&tmp), Vec::<String>::new());
}

/// A render whose output's folder is gone when it is written (removed meanwhile) is kept in the temporary
/// folder, and the error says where: the work is not lost.
#[test]
fn a_render_whose_output_cannot_be_written_is_kept() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let (folder, tmp) = (dir.path().join("out"), dir.path().join("tmp"));
    std::fs::create_dir(&folder).unwrap();
    std::fs::create_dir(&tmp).unwrap();
    let output = folder.join("cat.styled.png");
    let mut render = stylefarm_tests::stylefarm()
        .args(["render", "--size", "64", "--iterations", "60"])
        .args(["--progress", "json", "-o"])
        .arg(&output)
        .arg("--content")
        .arg(shared_image("chelsea.png"))
        .arg("--style")
        .arg(shared_image("starry_night.jpg"))
        .env("TMPDIR", &tmp)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // its output checked, its render started: the folder goes
    let mut progress = std::io::BufReader::new(render.stdout.take().unwrap());
    progress.read_line(&mut String::new()).unwrap();
    std::fs::remove_dir(&folder).unwrap();
    std::io::copy(&mut progress, &mut std::io::sink()).unwrap();
    let done = render.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(1), "{err}");
    let kept = stylefarm_tests::file_names(&tmp);
    assert_eq!(kept.len(), 1, "{err}");
    assert!(
        kept[0].starts_with("stylefarm-cat.styled-") && kept[0].ends_with(".png"),
        "{kept:?}"
    );
    let line = err.lines().last().unwrap_or_default();
    let kept_in = format!(
        "; the rendered image is kept in {}",
        tmp.join(&kept[0]).display()
    );
    assert!(
        line.starts_with(&format!("error: {}: cannot write: ", output.display()))
            && line.ends_with(&kept_in),
        "{err}"
    );
    let image = image::open(tmp.join(&kept[0])).unwrap();
    assert_eq!(image.width().max(image.height()), 64);
}

/// A black 24-bit BMP of `width` x `height` px (`width` a multiple of 4: rows unpadded), written
/// without an encoder (the image crate's, compiled into this crate unoptimized, is slow for a large one).
fn black_bmp(width: u32, height: u32) -> Vec<u8> {
    assert_eq!(width % 4, 0);
    let data = width * height * 3;
    let mut header = b"BM".to_vec();
    for field in [54 + data, 0, 54, 40, width, height] {
        header.extend(field.to_le_bytes());
    }
    header.extend(1u16.to_le_bytes()); // planes
    header.extend(24u16.to_le_bytes()); // bits a pixel
    for field in [0, data, 2835, 2835, 0, 0] {
        header.extend(field.to_le_bytes());
    }
    // zeroed memory from the allocator, not a loop over its bytes
    let mut bmp = vec![0u8; header.len() + data as usize];
    bmp[..header.len()].copy_from_slice(&header);
    bmp
}

/// Every bad input: a non-zero exit and one line on stderr that names the culprit.
#[test]
fn bad_input_gets_a_clear_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.png");
    std::fs::write(&corrupt, b"\x89PNG\r\n\x1a\n this is not really a png").unwrap();
    let (corrupt, missing) = (
        corrupt.display().to_string(),
        dir.path().join("missing.jpg").display().to_string(),
    );
    let (content, style) = (
        shared_image("tubingen.jpg"),
        shared_image("starry_night.jpg"),
    );
    let (content, style) = (content.to_str().unwrap(), style.to_str().unwrap());
    let scream = shared_image("the_scream.jpg");
    let scream = scream.to_str().unwrap();
    let out = dir.path().join("out.png").display().to_string();
    // 1 x 300 px: 2 x 32 px at --size 32, under relu5_1's 16 px
    let thin = dir.path().join("thin.png");
    RgbImage::new(1, 300).save(&thin).unwrap();
    let thin = thin.display().to_string();
    // an output that cannot be written, or would be written over an input: refused before the render
    let photo = dir.path().join("photo.jpg");
    std::fs::copy(shared_image("tubingen.jpg"), &photo).unwrap();
    let photo = photo.display().to_string();
    let typo = dir.path().join("typo/out.png").display().to_string();
    let webp = dir.path().join("out.webp").display().to_string();
    // (render writes no folder: its hint names none)
    let folder = dir.path().join("folder.png");
    std::fs::create_dir(&folder).unwrap();
    let folder = folder.display().to_string();
    let dir_name = dir.path().display().to_string();
    let dir_needle = format!("style: {dir_name} is a folder: render takes image files");
    // (options after --content C --style S unless given, what the error must name)
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--style-scale", "0.01"], "style_scale: style image"),
        (vec!["--style-size", "8"], "style_size: style image"),
        (
            vec!["--style-size", "20000"],
            "--style-size: must be between 0 and 16384",
        ),
        (
            vec!["--content", &thin, "--style", style],
            "size: content image",
        ),
        (
            vec![
                "--content",
                content,
                "--style",
                style,
                "--output-depth",
                "16",
                "-o",
                "x.jpg",
            ],
            "output_depth",
        ),
        (vec!["--content", &missing, "--style", style], "missing.jpg"),
        (vec!["-o", &typo], "typo does not exist"),
        (
            vec!["--content", &photo, "--style", style, "-o", &photo],
            "is one of the job's inputs",
        ),
        (vec!["-o", &webp], "out.webp: extension must be .png, .jpg"),
        (
            vec!["--content", content, "--style", &dir_name],
            &dir_needle,
        ),
        (
            vec!["-o", &folder],
            "folder.png: is a folder: give an image file name\n",
        ),
        (
            vec!["--content", content, "--style", &corrupt],
            "corrupt.png",
        ),
        (
            vec!["--optimizer", "sgd"],
            "--optimizer: unknown value 'sgd'",
        ),
        (vec!["--pooling", "min"], "--pooling: unknown value 'min'"),
        (
            vec!["--style-weight", "NaN"],
            "--style-weight: must be a number >= 0",
        ),
        (
            vec!["--content-weight", "-1"],
            "--content-weight: must be a number >= 0",
        ),
        (
            vec!["--tv-weight", "inf"],
            "--tv-weight: must be a number >= 0",
        ),
        // past float32 (the engine's precision), or overflowing it within a few iterations: the render
        // fails, naming the weight, instead of writing a black image
        (
            vec!["--content-weight", "1e39"],
            "--content-weight: must be a number >= 0 and at most 3.4028235e38 (float32)",
        ),
        (
            vec!["--style-weight", "1e20", "--iterations", "3"],
            "style_weight: the losses became NaN, after a style loss of",
        ),
        // a weight whose squared gradient overflows Adam's second moment, where every loss stays finite:
        // the image would stop changing, and the content be written as the result
        (
            vec![
                "--optimizer",
                "adam",
                "--style-weight",
                "1e25",
                "--iterations",
                "3",
            ],
            "style_weight: Adam's squared gradient overflowed float32 at iteration 1 ",
        ),
        (
            vec!["--iterations", "0"],
            "--iterations: must be between 1 and",
        ),
        // set, but not read by this job: refused, not dropped
        (
            vec!["--learning-rate", "3"],
            "learning_rate: is set, but this job does not read it: Adam's alone",
        ),
        (
            vec!["--optimizer", "adam", "--history-size", "3"],
            "history_size: is set",
        ),
        (
            vec![
                "--scales",
                "2",
                "--scale-iterations",
                "1,1",
                "--iterations",
                "77",
            ],
            "iterations: is set",
        ),
        (vec!["--temporal-weight", "5"], "temporal_weight: is set"),
        (
            vec!["--global-style-targets"],
            "global_style_targets: is set",
        ),
        (
            vec!["--normalize-gradients", "--block", "128"],
            "normalize_gradients: not with blocks",
        ),
        (vec!["--size", "0"], "--size: must be between 1 and"),
        // past the memory a CPU render may take (the machine's, or --device-memory's) by the engine's
        // estimate: refused at once, not killed by the kernel's OOM killer minutes in (a 4096-px render
        // on a 24-GiB machine was): 1024 x 768 px, 2.0 GB
        (
            vec!["--device-memory", "1GiB", "--size", "1024"],
            "out of memory: size: a 1024 x 768 render (VGG19's activations for the backward pass and \
             the optimizer's state) needs about 1.9 GiB of memory by stylefarm's estimate, more than the \
             1.0 GiB given by --device-memory",
        ),
        // the style targets' (the content's render fits): the style image at 8 x 256 px, 1.8 GiB
        (
            vec!["--device-memory", "1GiB", "--size", "256", "--style-scale", "8"],
            "out of memory: style_scale: the style image at 2048 x 1280, for its style targets",
        ),
        // of two styles at 1408 px, the second: 1106 x 1408 px, 1.1 GiB (the first, 1408 x 880, fits)
        (
            vec![
                "--device-memory",
                "1GiB",
                "--size",
                "256",
                "--style-scale",
                "5.5",
                "--content",
                content,
                "--style",
                style,
                scream,
            ],
            "out of memory: style_scale: style image 2 of 2 at 1106 x 1408, for its style targets",
        ),
        (vec!["--size", "abc"], "--size: 'abc' is not a whole number"),
        (vec!["--style-blend", "0.5,0.5"], "style_blend"),
        // several styles after one --style, as local takes them
        (
            vec![
                "--content",
                content,
                "--style",
                style,
                style,
                "--style-blend",
                "1,2,3",
            ],
            "style_blend: has 3 weights for 2 style images",
        ),
        (vec!["--style-layer-weights", "1,2"], "style_layer_weights"),
        (
            vec!["--style-layer-weights", "1,-2,1,1,1"],
            "--style-layer-weights: must be a number >= 0",
        ),
        (vec!["--init", &missing], "missing.jpg"),
        (
            vec!["--style-layers", "relu9_9"],
            "--style-layers: 'relu9_9'",
        ),
        (vec!["--device", "tpu"], "device"),
        (
            vec!["--weights", "/nonexistent/w.safetensors"],
            "deploy/setup.sh",
        ),
        (vec!["--weights", "/tmp"], "weights /tmp: is a folder"),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["render"];
        if !extra.contains(&"-o") {
            args.extend(["-o", &out]);
        }
        if !extra.contains(&"--content") {
            args.extend(["--content", content, "--style", style]);
        }
        // (no progress: its lines, where stderr is not a terminal, come before an error mid-render)
        for (flag, value) in [
            ("--size", "32"),
            ("--iterations", "1"),
            ("--progress", "none"),
        ] {
            if !extra.contains(&flag) {
                args.extend([flag, value]);
            }
        }
        args.extend(&extra);
        let result = stylefarm(&args);
        let err = stderr(&result);
        // a value not of its option's kind or range: the argument parser's error, exit code 2, naming
        // the flag, with a usage hint
        if let Some((flag, reason)) = needle.split_once(": ").filter(|_| needle.starts_with("--")) {
            assert_eq!(result.status.code(), Some(2), "{args:?}: {err}");
            assert!(
                err.starts_with("error: invalid value")
                    && err.contains(flag)
                    && err.contains(reason),
                "{args:?}: not the parser's error naming {flag}: {err}"
            );
            continue;
        }
        assert_eq!(
            result.status.code(),
            Some(1),
            "{args:?}: {}",
            stderr(&result)
        );
        assert!(
            err.starts_with("error: ") && err.trim_end().lines().count() == 1,
            "{args:?}: not one error line: {err}"
        );
        assert!(
            err.contains(needle),
            "{args:?}: error does not name {needle}: {err}"
        );
    }
    // an evaluation optimizes nothing: an option of the optimization is refused, naming it, as is an
    // image evaluated that is too small for VGG19 (named as the image evaluated, not as the content), or
    // too large for the memory it may take by the engine's estimate (2048 x 1536 px: 2.2 GiB)
    let huge = dir.path().join("huge.bmp");
    std::fs::write(&huge, black_bmp(2048, 1536)).unwrap();
    let huge = huge.display().to_string();
    for (extra, needle) in [
        (
            vec!["--evaluate", &huge, "--device-memory", "1GiB"],
            "out of memory: evaluate: evaluating a 2048 x 1536 image needs about",
        ),
        (vec!["--evaluate", content, "--size", "256"], "size: is set"),
        (
            vec!["--evaluate", content, "--optimizer", "adam"],
            "optimizer: is set",
        ),
        (vec!["--evaluate", &thin], "evaluate: "),
    ] {
        let args = [
            vec!["render", "--content", content, "--style", style],
            extra,
        ]
        .concat();
        let result = stylefarm(&args);
        let err = stderr(&result);
        assert_eq!(result.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(needle) && (needle != "evaluate: " || err.contains(&thin)),
            "{args:?}: {err}"
        );
    }
    let result = stylefarm(&[
        "render",
        "--content",
        content,
        "--style",
        style,
        "--evaluate",
        content,
        "--save-every",
        "5",
    ]);
    assert_eq!(result.status.code(), Some(2), "{}", stderr(&result));
    assert!(
        !Path::new(&out).exists(),
        "no output written by a failed render"
    );
    assert_eq!(
        std::fs::read(&photo).unwrap(),
        std::fs::read(shared_image("tubingen.jpg")).unwrap(),
        "the content is not written over"
    );
}

/// `--device-memory` on a GPU caps libtorch's allocator, which needs the GPU's total memory: where the NVIDIA
/// driver does not tell it (no driver, no such GPU), a worker or local farm on CUDA is refused at once,
/// naming the field, before it connects or loads anything; on the CPU (or auto without a GPU) the memory is
/// only reported, and 0 bytes are refused.
#[test]
fn device_memory_on_a_gpu_the_driver_cannot_read_is_refused_at_once() {
    if stylefarm_worker::gpu_total_memories().is_ok_and(|gpus| !gpus.is_empty()) {
        eprintln!("skipped: this machine has a GPU");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png").display().to_string();
    let (content, style) = (
        shared_image("tubingen.jpg"),
        shared_image("starry_night.jpg"),
    );
    let (content, style) = (content.to_str().unwrap(), style.to_str().unwrap());
    for args in [
        vec![
            "worker",
            "--device",
            "cuda:1",
            "--coordinator",
            "http://127.0.0.1:9",
        ],
        vec![
            "local",
            "--device",
            "cuda",
            "--content",
            content,
            "--style",
            style,
            "-o",
            &out,
        ],
    ] {
        let result = stylefarm(&[&args[..], &["--device-memory", "8GiB"]].concat());
        let err = stderr(&result);
        assert_eq!(result.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.starts_with("error: device_memory: ")
                && err.contains("GPU")
                && err.trim_end().lines().count() == 1,
            "{args:?}: {err}"
        );
    }
    let result = stylefarm(&["worker", "--device", "cpu", "--device-memory", "0GiB"]);
    let err = stderr(&result);
    assert!(
        !result.status.success() && err.contains("device-memory") && err.contains("more than 0"),
        "{err}"
    );
    // a name the coordinator would refuse stops the worker at once, naming the flag
    let result = stylefarm(&["worker", "--device", "cpu", "--name", "two\nlines"]);
    let err = stderr(&result);
    assert!(
        result.status.code() == Some(1)
            && err.starts_with("error: --name: ")
            && err.contains("control"),
        "{err}"
    );
    // auto without a GPU renders on the CPU, the memory reported only
    let args = [
        &tiny_local(content, style, &out)[..],
        &["--device", "auto", "--device-memory", "8GiB"],
    ];
    let result = stylefarm(&args.concat());
    assert!(result.status.success(), "{}", stderr(&result));
    assert!(Path::new(&out).exists());
}

/// The arguments of a `local` job of one 32-px iteration of `content` in the style of `style` to `out`.
fn tiny_local<'a>(content: &'a str, style: &'a str, out: &'a str) -> [&'a str; 11] {
    [
        "local",
        "--content",
        content,
        "--style",
        style,
        "--size",
        "32",
        "--iterations",
        "1",
        "-o",
        out,
    ]
}

/// Without `--device-memory`, `local`'s workers on one device (here the CPU) report their share of its
/// memory, so that the tiles planned for each, rendered at once, fit it together.
#[test]
fn local_workers_on_one_device_report_their_share_of_its_memory() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png").display().to_string();
    let (content, style) = (
        shared_image("chelsea.png"),
        shared_image("starry_night.jpg"),
    );
    let (content, style) = (content.to_str().unwrap(), style.to_str().unwrap());
    let registered = |workers: &str| {
        let result = stylefarm_tests::stylefarm()
            .args(tiny_local(content, style, &out))
            .args(["--device", "cpu", "--workers", workers])
            .env("STYLEFARM_LOG", "info")
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let err = stderr(&result);
        assert!(result.status.success(), "{err}");
        err.lines()
            .filter(|l| l.contains("stylefarm_worker: registered"))
            .map(|l| {
                let v = l.split("memory_bytes=").nth(1).unwrap();
                v.split(|c: char| !c.is_ascii_digit())
                    .next()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
            })
            .collect::<Vec<_>>()
    };
    let (one, two) = (registered("1"), registered("2"));
    assert!(one.len() == 1 && one[0] > 1 << 20, "{one:?}");
    assert_eq!(two, [one[0] / 2, one[0] / 2]);
}

/// Iteration 0 of `stylefarm render` against tests/objective_numpy.py, ALGORITHM.md's objective written
/// again in numpy (float64), on images already at the working size: within 1e-3 relative, with the default
/// style layer weights and with uneven ones, and with each pooling.
#[test]
fn iteration_zero_matches_an_independent_numpy_objective() {
    let repo = stylefarm_tests::repo();
    let python = repo.join(".stylefarm/venv/bin/python");
    assert!(
        python.exists(),
        "{} missing: run deploy/setup.sh",
        python.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let prepare = |name: &str, w: u32, h: u32| {
        let img = image::open(shared_image(name)).unwrap().to_rgb8();
        let path = dir.path().join(format!("{name}.png"));
        image::imageops::resize(&img, w, h, image::imageops::FilterType::Lanczos3)
            .save(&path)
            .unwrap();
        path
    };
    let content = prepare("tubingen.jpg", 128, 96);
    let style = prepare("starry_night.jpg", 128, 80);
    let init = prepare("shipwreck.jpg", 128, 96);
    let out = dir.path().join("out.png");
    let weights = repo.join(".stylefarm/vgg19.safetensors");
    // ALGORITHM.md's layer weights: 1 each, then uneven ones (a zero among them); then the other poolings
    let cases = [
        (None, "max"),
        (Some("3,0.5,2,0,1.5"), "max"),
        (None, "avg"),
        (None, "l2"),
    ];
    for (layer_weights, pooling) in cases {
        let mut args = vec![
            "--pooling",
            pooling,
            "--init",
            init.to_str().unwrap(),
            "--size",
            "128",
            "--iterations",
            "1",
            "--optimizer",
            "adam",
            "--tv-weight",
            "0.01",
        ];
        args.extend(
            layer_weights
                .map(|w| ["--style-layer-weights", w])
                .iter()
                .flatten(),
        );
        let ours = first_progress(&content, &style, &out, &args);
        let numpy = Command::new(&python)
            .arg(repo.join("tests/objective_numpy.py"))
            .args(["--pooling", pooling])
            .args([&weights, &content, &style, &init])
            .args(["5", "100", "0.01"])
            .args(layer_weights)
            .output()
            .unwrap();
        assert!(numpy.status.success(), "{}", stderr(&numpy));
        let theirs: Value = serde_json::from_slice(&numpy.stdout).unwrap();
        for key in ["content_loss", "style_loss", "tv_loss", "total_loss"] {
            let (a, b) = (f(&ours, key), f(&theirs, key));
            assert!(
                b > 0.0 && (a - b).abs() <= 1e-3 * b,
                "{key} (layer weights {layer_weights:?}, {pooling} pooling): stylefarm {a} vs numpy {b}"
            );
        }
    }
}

/// Colour histogram matching (`--match-colors`): the render's style targets are those of the style image
/// with the content's colours (`imaging::matched_colors` of the images as given), so that iteration 0's
/// style loss equals that of a plain render of the matched style written out, bit for bit, and differs from
/// the plain render of the style as it is.
#[test]
fn match_colors_renders_against_the_style_with_the_content_s_colours() {
    let dir = tempfile::tempdir().unwrap();
    let (content, style) = (
        shared_image("tubingen.jpg"),
        shared_image("starry_night.jpg"),
    );
    let matched = dir.path().join("matched.png");
    stylefarm_core::imaging::matched_colors(
        &image::open(&style).unwrap().to_rgb8(),
        &image::open(&content).unwrap().to_rgb8(),
    )
    .save(&matched)
    .unwrap();
    let out = dir.path().join("out.png");
    let style_loss = |style: &Path, extra: &[&str]| {
        let args = [&["--size", "64", "--iterations", "1"], extra].concat();
        f(&first_progress(&content, style, &out, &args), "style_loss")
    };
    let with_flag = style_loss(&style, &["--match-colors"]);
    let of_matched = style_loss(&matched, &[]);
    let plain = style_loss(&style, &[]);
    assert_eq!(with_flag, of_matched);
    assert!(
        (with_flag - plain).abs() > 1e-3 * plain,
        "{with_flag} vs {plain}"
    );
    // not with luminance-only transfer, whose styles are their luminance alone
    let refused = stylefarm(&[
        "render",
        "--content",
        content.to_str().unwrap(),
        "--style",
        style.to_str().unwrap(),
        "--match-colors",
        "--luminance-only",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("match_colors: not with luminance_only"));
}

/// A cut-out logo as people have them: an RGBA PNG whose transparent half hides magenta. The engine sees it
/// over white (no magenta in the render), the output carries the content's alpha, in 16 bits when asked.
#[test]
fn a_transparent_content_keeps_its_cut_out_and_16_bits_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let logo = dir.path().join("logo.png");
    image::RgbaImage::from_fn(48, 32, |x, y| {
        if x < 24 {
            image::Rgba([255, 0, 255, 0])
        } else {
            image::Rgba([30, (y * 7) as u8, 200, 255])
        }
    })
    .save(&logo)
    .unwrap();
    let style = shared_image("starry_night.jpg");
    let out = dir.path().join("out.png");
    let result = stylefarm(&[
        "render",
        "--content",
        logo.to_str().unwrap(),
        "--style",
        style.to_str().unwrap(),
        "--size",
        "48",
        "--iterations",
        "2",
        "--output-depth",
        "16",
        "--progress",
        "none",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(result.status.success(), "{}", stderr(&result));
    let img = image::open(&out).unwrap();
    assert_eq!(img.color(), image::ColorType::Rgba16);
    let img = img.to_rgba16();
    assert_eq!(img.dimensions(), (48, 32));
    for (x, _, p) in img.enumerate_pixels() {
        let [r, g, b, a] = p.0;
        assert_eq!(a, if x < 24 { 0 } else { 65_535 }, "alpha at x = {x}");
        if x < 20 {
            // the hidden colour does not show: the engine started from white there
            let magenta = r > 40_000 && b > 40_000 && g < 20_000;
            assert!(!magenta, "magenta at x = {x}: {:?}", p.0);
        }
    }
    // 16 bits from floats: not every value is an 8-bit one times 257
    assert!(img.pixels().any(|p| p.0[..3].iter().any(|v| v % 257 != 0)));
}

/// `content` rendered in the style of `style` at 64 px with `extra` options, written under `dir`; the image.
fn render_64(dir: &Path, content: &Path, style: &Path, extra: &[&str]) -> RgbImage {
    let output = dir.join("out.png");
    render_to(
        content,
        style,
        &output,
        &[&["--size", "64"], extra].concat(),
    );
    image::open(&output).unwrap().to_rgb8()
}

/// crowsonkb/style-transfer-pytorch's inits, seen through one Adam step too small to move a grey level:
/// `gray` is mid grey (127.5 plus up to one level), `style_mean` the style image's mean colour (plus up to
/// one level), `uniform` noise over the whole range.
#[test]
fn crowsonkbs_inits_start_grey_at_the_styles_mean_or_from_uniform_noise() {
    let dir = tempfile::tempdir().unwrap();
    let (content, style) = (
        shared_image("tubingen.jpg"),
        shared_image("starry_night.jpg"),
    );
    let start = |init: &str| {
        let args = [
            "--init",
            init,
            "--optimizer",
            "adam",
            "--learning-rate",
            "0.000001",
            "--iterations",
            "1",
        ];
        render_64(dir.path(), &content, &style, &args)
    };
    let channel = |img: &RgbImage, c: usize| -> Vec<f64> {
        img.pixels().map(|p| f64::from(p.0[c])).collect()
    };
    let mean = |img: &RgbImage, c: usize| {
        channel(img, c).iter().sum::<f64>() / f64::from(img.width() * img.height())
    };
    let gray = start("gray");
    assert!(gray
        .pixels()
        .all(|p| p.0.iter().all(|v| (127..=129).contains(v))));
    for c in 0..3 {
        assert!((mean(&gray, c) - 128.0).abs() < 0.05, "{}", mean(&gray, c));
    }
    let painting = image::open(&style).unwrap().to_rgb8();
    let at_mean = start("style_mean");
    for c in 0..3 {
        let m = mean(&painting, c);
        let (lo, hi) = (m.floor() - 1.0, m.ceil() + 1.0);
        assert!(
            channel(&at_mean, c).iter().all(|&v| v >= lo && v <= hi),
            "{c}: {m}"
        );
    }
    let uniform = start("uniform");
    for c in 0..3 {
        let values = channel(&uniform, c);
        let (lo, hi) = values
            .iter()
            .fold((255.0f64, 0.0f64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        assert!(
            (mean(&uniform, c) - 127.5).abs() < 4.0 && lo <= 3.0 && hi >= 252.0,
            "{c}: {lo} {hi}"
        );
    }
}

/// `src` (a safetensors file) written to `dst` with its metadata's `preprocessing` set to `convention`: the
/// same tensors read in another input space.
fn relabel_weights(src: &Path, dst: &Path, convention: &str) {
    let bytes = std::fs::read(src).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    header["__metadata__"]["preprocessing"] = Value::from(convention);
    let mut json = serde_json::to_vec(&header).unwrap();
    // the format allows trailing spaces: the tensors stay 8-byte aligned
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + len..]);
    std::fs::write(dst, out).unwrap();
}

/// Adam's learning rate is in grey levels (0..255 units, ALGORITHM.md) whatever the weights' input space:
/// its first step moves each pixel by about the rate (Adam's first step is the rate times the gradient's
/// sign), with the Caffe weights (1 unit a grey level) and with the same weights read as torchvision's
/// (1/57.6 of a grey level a unit, where an unscaled rate of 6 would move a pixel by 346 levels).
#[test]
fn adams_learning_rate_is_in_grey_levels_with_either_weights_convention() {
    let dir = tempfile::tempdir().unwrap();
    let content = RgbImage::from_fn(64, 48, |x, y| {
        image::Rgb([
            (70 + x * 2) as u8,
            (80 + y * 2) as u8,
            (120 + (x + y) % 40) as u8,
        ])
    });
    let content_path = dir.path().join("content.png");
    content.save(&content_path).unwrap();
    let caffe = stylefarm_tests::repo().join(".stylefarm/vgg19.safetensors");
    let torchvision = dir.path().join("torchvision.safetensors");
    relabel_weights(&caffe, &torchvision, "torchvision");
    let style = shared_image("starry_night.jpg");
    for weights in [&caffe, &torchvision] {
        let rendered = render_64(
            dir.path(),
            &content_path,
            &style,
            &[
                "--weights",
                weights.to_str().unwrap(),
                "--optimizer",
                "adam",
                "--learning-rate",
                "6",
                "--iterations",
                "1",
            ],
        );
        let mut moved: Vec<i32> = rendered
            .as_raw()
            .iter()
            .zip(content.as_raw())
            .map(|(&a, &b)| (i32::from(a) - i32::from(b)).abs())
            .collect();
        moved.sort_unstable();
        let (median, most) = (moved[moved.len() / 2], moved[moved.len() - 1]);
        assert!(
            median == 6 && most <= 7,
            "{}: pixels moved by {median} grey levels (median), {most} at most",
            weights.display()
        );
    }
}

/// `stylefarm seams` prints the seam measure of an image over a tile grid, as JSON that parses whatever the
/// file's name holds (a control character here), and says why it cannot measure: one tile, or a flat image.
#[test]
fn seams_prints_json_and_says_why_it_cannot_measure() {
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("we\u{1}ird \"name\".png");
    RgbImage::from_fn(1200, 900, |x, y| {
        image::Rgb([
            (x * 7 % 256) as u8,
            (y * 13 % 256) as u8,
            ((x + y) % 256) as u8,
        ])
    })
    .save(&odd)
    .unwrap();
    let out = stylefarm(&["seams", "--json", odd.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["image"], odd.to_str().unwrap());
    assert_eq!(
        (json["width"].as_u64(), json["height"].as_u64()),
        (Some(1200), Some(900))
    );
    assert!(json["tiles"].as_u64().unwrap() > 1, "{json}");
    assert!(json["seam_measure"].as_f64().unwrap() > 0.0, "{json}");
    let flat = dir.path().join("flat.png");
    RgbImage::from_pixel(1200, 900, image::Rgb([90, 90, 90]))
        .save(&flat)
        .unwrap();
    let out = stylefarm(&["seams", flat.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("the image is flat"),
        "{}",
        stderr(&out)
    );
    let small = dir.path().join("small.png");
    RgbImage::from_pixel(300, 200, image::Rgb([1, 2, 3]))
        .save(&small)
        .unwrap();
    let out = stylefarm(&["seams", small.to_str().unwrap()]);
    assert!(
        stderr(&out).contains("is one 512-px tile"),
        "{}",
        stderr(&out)
    );
}

/// `weights convert` refuses to write the converted weights over their input (the same file by another
/// path), naming `output`, and leaves it as it was.
#[test]
fn weights_convert_does_not_write_over_its_input() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("vgg19.pth");
    std::fs::write(&input, b"weights").unwrap();
    let same = dir.path().join(".").join("vgg19.pth");
    let out = stylefarm(&[
        "weights",
        "convert",
        "--from",
        "torchvision-pth",
        input.to_str().unwrap(),
        same.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("output: ") && stderr(&out).contains("is the input"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(&input).unwrap(), b"weights");
}

/// A job's option that it would not read is refused before anything starts, naming it: a batch's style
/// blend (each content with each style alone), and beside a sweep an option that no point reads, or that
/// the sweep varies too (its values would replace it).
#[test]
fn local_refuses_an_option_its_job_would_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (content, style) = (
        shared_image("tubingen.jpg"),
        shared_image("starry_night.jpg"),
    );
    let (content, style) = (content.to_str().unwrap(), style.to_str().unwrap());
    let common = ["local", "--content", content, "-o", out.to_str().unwrap()];
    for (extra, refused) in [
        (
            &[
                "--batch",
                "--style",
                style,
                style,
                "--style-blend",
                "0.7,0.3",
            ][..],
            "style_blend: is set, but this job does not read it: a batch renders each",
        ),
        (
            &[
                "--style",
                style,
                "--sweep",
                "style_weight=10,100",
                "--learning-rate",
                "5",
            ],
            "learning_rate: is set, but no point of the sweep reads it: Adam's alone",
        ),
        (
            &[
                "--style",
                style,
                "--sweep",
                "style_weight=10,100",
                "--style-weight",
                "50",
            ],
            "style_weight: is set, but the sweep varies it too",
        ),
    ] {
        let out = stylefarm(&[&common[..], extra].concat());
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(refused), "{}", stderr(&out));
    }
    assert!(!out.exists(), "nothing started");
}
