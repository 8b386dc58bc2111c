//! VGG19's convolution stack, its weights, and the conversion between images and the network's input space.

use std::path::Path;

use image::{Rgb32FImage, RgbImage};
use stylefarm_core::{Layer, Pooling};
use tch::{Device, Kind, Tensor};

use crate::Error;

/// How images are turned into the network's input; recorded in the weights file's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preprocessing {
    /// Oxford/Caffe weights: RGB 0..255 -> BGR, minus the mean [103.939, 116.779, 123.68] (B, G, R).
    Caffe,
    /// torchvision weights: RGB 0..1, minus [0.485, 0.456, 0.406], divided by [0.229, 0.224, 0.225].
    Torchvision,
}

const CAFFE_MEAN_BGR: [f64; 3] = [103.939, 116.779, 123.68];
const TORCHVISION_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const TORCHVISION_STD: [f64; 3] = [0.229, 0.224, 0.225];

/// Convolutions after which a 2x2 pooling follows: the last of blocks 1-4.
const POOL_AFTER: [usize; 4] = [1, 3, 7, 11];

impl Preprocessing {
    fn channel_tensor(values: [f64; 3], device: Device) -> Tensor {
        Tensor::from_slice(&values.map(|v| v as f32))
            .reshape([1, 3, 1, 1])
            .to_device(device)
    }

    /// An 8-bit RGB image as a `1 x 3 x H x W` float tensor in this convention's input space.
    pub fn preprocess(self, img: &RgbImage, device: Device) -> Tensor {
        let (w, h) = img.dimensions();
        let rgb = Tensor::from_slice(img.as_raw())
            .to_device(device)
            .reshape([1, h as i64, w as i64, 3])
            .permute([0, 3, 1, 2])
            .to_kind(Kind::Float);
        self.input_of_rgb(&rgb)
    }

    /// `x` (`1 x 3 x H x W`, this input space) made grey: its luminance (Y of full-range BT.601, as
    /// `imaging::luminance`, unrounded) in all three channels, in this input space. No gradient.
    pub fn luminance(self, x: &Tensor) -> Tensor {
        let weights = Self::channel_tensor(stylefarm_core::imaging::LUMA_WEIGHTS, x.device());
        let y = (self.to_rgb(x) * weights).sum_dim_intlist([1i64].as_slice(), true, Kind::Float);
        self.input_of_rgb(&y.expand([-1, 3, -1, -1], false))
    }

    /// RGB floats, 0..255 (`1 x 3 x H x W`), in this convention's input space.
    pub(crate) fn input_of_rgb(self, rgb: &Tensor) -> Tensor {
        let device = rgb.device();
        match self {
            Preprocessing::Caffe => rgb.flip([1]) - Self::channel_tensor(CAFFE_MEAN_BGR, device),
            Preprocessing::Torchvision => {
                (rgb / 255.0 - Self::channel_tensor(TORCHVISION_MEAN, device))
                    / Self::channel_tensor(TORCHVISION_STD, device)
            }
        }
        .contiguous()
    }

    /// The inverse of [`Self::preprocess`] in floats, clamped to 0..255 but not rounded: for outputs of
    /// more than 8 bits.
    pub fn deprocess_f32(self, x: &Tensor) -> Result<Rgb32FImage, Error> {
        let (h, w) = (x.size()[2], x.size()[3]);
        let values = self
            .to_rgb(x)
            .f_clamp(0.0, 255.0)?
            .f_squeeze_dim(0)?
            .f_permute([1, 2, 0])?
            .f_contiguous()?
            .flatten(0, -1)
            .f_to_device(Device::Cpu)?;
        let data = Vec::<f32>::try_from(&values)?;
        Rgb32FImage::from_raw(w as u32, h as u32, data)
            .ok_or_else(|| Error::Input(format!("a {w} x {h} image from {} values", 3 * w * h)))
    }

    /// RGB 0..255 floats (`1 x 3 x H x W`) of a preprocessed `x`.
    fn to_rgb(self, x: &Tensor) -> Tensor {
        let device = x.device();
        match self {
            Preprocessing::Caffe => {
                (x.detach() + Self::channel_tensor(CAFFE_MEAN_BGR, device)).flip([1])
            }
            Preprocessing::Torchvision => {
                (x.detach() * Self::channel_tensor(TORCHVISION_STD, device)
                    + Self::channel_tensor(TORCHVISION_MEAN, device))
                    * 255.0
            }
        }
    }

    /// The inverse of [`Self::preprocess`], clamped to 0..255 and rounded.
    pub fn deprocess(self, x: &Tensor) -> Result<RgbImage, Error> {
        let rgb = self.to_rgb(x);
        let (h, w) = (x.size()[2], x.size()[3]);
        let bytes = rgb
            .clamp(0.0, 255.0)
            .round()
            .to_kind(Kind::Uint8)
            .squeeze_dim(0)
            .permute([1, 2, 0]);
        let data = Vec::<u8>::try_from(&bytes.contiguous().flatten(0, -1).to_device(Device::Cpu))?;
        RgbImage::from_raw(w as u32, h as u32, data)
            .ok_or_else(|| Error::Input(format!("a {w} x {h} image from {} bytes", 3 * w * h)))
    }

    /// One 0..255 grey level in this space: 1 for Caffe; 1 / 255 / 0.226 for torchvision (0.226: the mean of
    /// its three standard deviations). What the settings given in 0..255 units (the noise init's sigma,
    /// Adam's learning rate) are multiplied by.
    pub fn per_255(self) -> f64 {
        match self {
            Preprocessing::Caffe => 1.0,
            Preprocessing::Torchvision => 1.0 / 255.0 / 0.226,
        }
    }

    /// Every preprocessing.
    pub const ALL: [Preprocessing; 2] = [Preprocessing::Caffe, Preprocessing::Torchvision];

    /// Its name, as the weights file's metadata and a checkpoint file say it: `caffe` or `torchvision`.
    pub fn name(self) -> &'static str {
        match self {
            Preprocessing::Caffe => "caffe",
            Preprocessing::Torchvision => "torchvision",
        }
    }

    /// Standard deviation of the noise init in this space (jcjohnson: 0.001 in 0..255-scale units).
    pub fn noise_sigma(self) -> f64 {
        0.001 * self.per_255()
    }
}

/// VGG19's 16 3x3 convolutions (padding 1) with ReLU and 2x2 stride-2 pooling after blocks 1-4.
pub struct Vgg19 {
    convs: Vec<(Tensor, Tensor)>,
    preprocessing: Preprocessing,
    /// Activations and weights in the channels-last layout (NHWC strides for NCHW shapes, what
    /// `torch.channels_last` makes): the layout cuDNN's tensor-core convolutions prefer.
    channels_last: bool,
    /// Whether cuDNN may run the convolutions in TensorFloat-32 (`torch.backends.cudnn.allow_tf32`, on by
    /// default in PyTorch): 10-bit mantissas in the products, float32 sums. Only NVIDIA GPUs from Ampere on
    /// read it; elsewhere the convolutions are float32 either way.
    tf32: bool,
    /// Whether cuDNN times its algorithms per input shape (`torch.backends.cudnn.benchmark`) on a GPU.
    cudnn_benchmark: bool,
}

/// [`Pooling::L2`]: `torch.nn.LPPool2d(2, 2)` (the square root of each 2x2 window's sum of squares, from
/// an average times the window's 4 values, as torch computes it) times crowsonkb/style-transfer-pytorch's
/// 0.78. A window of zeros (frequent after a ReLU) has a gradient of 0, not NaN: the ReLU before the root
/// masks the root's infinite derivative there, as in torch.
fn l2_pool(h: &Tensor) -> Result<Tensor, Error> {
    Ok((h
        .f_square()?
        .f_avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None)?
        * 4.0)
        .f_relu()?
        .f_sqrt()?
        * L2_POOL_SCALE)
}

/// What crowsonkb/style-transfer-pytorch multiplies its L2 pooling by (`pooling_scales['l2']`), so that
/// the deeper layers see activations of about max pooling's size.
const L2_POOL_SCALE: f64 = 0.78;

/// `t` (`N x C x H x W`) with channels-last strides: the same values and shape, NHWC in memory (PyTorch's
/// `t.contiguous(memory_format=torch.channels_last)`, which tch does not expose).
fn to_channels_last(t: &Tensor) -> Result<Tensor, Error> {
    Ok(t.f_permute([0, 2, 3, 1])?
        .f_contiguous()?
        .f_permute([0, 3, 1, 2])?)
}

/// Reads the JSON header's `__metadata__` of a safetensors file.
fn safetensors_metadata(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|_| "too short for a safetensors file".to_string())?;
    let len = u64::from_le_bytes(len);
    if len > 100_000_000 {
        return Err("not a safetensors file (header too large)".into());
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|_| "truncated safetensors header".to_string())?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| format!("not a safetensors file ({e})"))?;
    Ok(header
        .get("__metadata__")
        .and_then(|m| m.as_object())
        .cloned()
        .unwrap_or_default())
}

impl Vgg19 {
    /// Loads `convB_C.weight` / `convB_C.bias` of the 16 convolutions from a safetensors file written by
    /// deploy/convert_weights.py, onto `device`.
    pub fn load(path: &Path, device: Device) -> Result<Vgg19, Error> {
        let err = |message: String| Error::Weights {
            path: path.display().to_string(),
            message,
        };
        if !path.exists() {
            return Err(err(
                "file not found; run `bash deploy/setup.sh` to fetch and convert the VGG19 weights, or pass \
                 --weights / STYLEFARM_WEIGHTS"
                    .into(),
            ));
        }
        if path.is_dir() {
            return Err(err("is a folder, not a .safetensors file".into()));
        }
        let metadata = safetensors_metadata(path).map_err(err)?;
        let named = metadata.get("preprocessing").and_then(|v| v.as_str());
        let preprocessing = match Preprocessing::ALL
            .into_iter()
            .find(|p| Some(p.name()) == named)
        {
            Some(p) => p,
            None => {
                return Err(err(format!(
                    "metadata 'preprocessing' is {named:?}; expected one of {:?} (convert with \
                     deploy/convert_weights.py)",
                    Preprocessing::ALL.map(Preprocessing::name)
                )))
            }
        };
        let mut named: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(path)
            .map_err(|e| err(e.to_string()))?
            .into_iter()
            .collect();
        let mut convs = Vec::with_capacity(16);
        let mut channels_in = 3;
        for layer in Layer::all() {
            let name = format!("conv{}_{}", layer.block, layer.conv);
            let mut take = |part: &str| {
                named
                    .remove(&format!("{name}.{part}"))
                    .ok_or_else(|| err(format!("no tensor {name}.{part}")))
            };
            let (weight, bias) = (take("weight")?, take("bias")?);
            let out = i64::from(layer.channels());
            if weight.size() != [out, channels_in, 3, 3] || bias.size() != [out] {
                return Err(err(format!(
                    "{name} has shapes {:?} / {:?}, not VGG19's [{out}, {channels_in}, 3, 3] / [{out}]",
                    weight.size(),
                    bias.size()
                )));
            }
            channels_in = out;
            let load = |t: Tensor| {
                t.to_kind(Kind::Float)
                    .to_device(device)
                    .set_requires_grad(false)
            };
            convs.push((load(weight), load(bias)));
        }
        Ok(Vgg19 {
            convs,
            preprocessing,
            channels_last: false,
            tf32: true,
            cudnn_benchmark: true,
        })
    }

    /// Puts the weights, and from then on every input, in the channels-last layout (or back).
    pub fn set_channels_last(&mut self, on: bool) -> Result<(), Error> {
        if on != self.channels_last {
            for (w, _) in &mut self.convs {
                *w = if on {
                    to_channels_last(w)?
                } else {
                    w.f_contiguous()?
                };
            }
            self.channels_last = on;
        }
        Ok(())
    }

    /// Whether the weights and inputs are in the channels-last (NHWC) layout ([`Self::set_channels_last`]).
    pub fn channels_last(&self) -> bool {
        self.channels_last
    }

    /// Lets cuDNN run the convolutions in TensorFloat-32 (on as loaded, as PyTorch's
    /// `torch.backends.cudnn.allow_tf32`), or holds them to float32: the forward ones; autograd's
    /// backward (at::convolution_backward) reads libtorch's global flag instead.
    pub fn set_tf32(&mut self, on: bool) {
        self.tf32 = on;
    }

    /// Whether cuDNN may run the convolutions in TensorFloat-32 ([`Self::set_tf32`]).
    pub fn tf32(&self) -> bool {
        self.tf32
    }

    /// Lets cuDNN time its algorithms for each new input shape and keep the fastest (as
    /// `torch.backends.cudnn.benchmark = True`; on as loaded), or take its heuristics' first choice: the
    /// forward convolutions; autograd's backward reads libtorch's global flag, which
    /// [`crate::Engine::load_with`] sets.
    pub fn set_cudnn_benchmark(&mut self, on: bool) {
        self.cudnn_benchmark = on;
    }

    /// Whether cuDNN times its algorithms per input shape ([`Self::set_cudnn_benchmark`]).
    pub fn cudnn_benchmark(&self) -> bool {
        self.cudnn_benchmark
    }

    /// The input convention of the loaded weights, read from the file's metadata: how images enter the
    /// network ([`Preprocessing::preprocess`]) and leave it.
    pub fn preprocessing(&self) -> Preprocessing {
        self.preprocessing
    }

    /// Runs the network on `x` (`1 x 3 x H x W`, preprocessed) up to the deepest of `layers`, and returns the
    /// feature maps of `layers`, in their order. Nothing past the deepest layer is computed. An input whose
    /// side is under the deepest layer's [`Layer::min_input_side`] is an error (callers check sizes first,
    /// naming the option: `RenderParams::check_sizes`); so is a failure of libtorch (e.g. out of memory).
    pub fn features(
        &self,
        x: &Tensor,
        pooling: Pooling,
        layers: &[Layer],
    ) -> Result<Vec<Tensor>, Error> {
        let deepest = layers.iter().copied().max().unwrap_or(Layer::new(1, 1));
        let size = x.size();
        let (h, w) = match size[..] {
            [1, 3, h, w] => (h, w),
            _ => {
                return Err(Error::Input(format!(
                    "the network takes a 1 x 3 x H x W image, not {size:?}"
                )))
            }
        };
        let need = i64::from(deepest.min_input_side());
        if h.min(w) < need {
            return Err(Error::Input(format!(
                "a {w} x {h} px image cannot reach {deepest}: it needs at least {need} px a side"
            )));
        }
        let deepest = deepest.index();
        let mut out: Vec<Option<Tensor>> = layers.iter().map(|_| None).collect();
        let mut h = if self.channels_last {
            to_channels_last(x)?
        } else {
            x.shallow_clone()
        };
        // cuDNN's autotuner (`torch.backends.cudnn.benchmark`) on the GPU as set; the rest are
        // `torch.conv2d`'s defaults, except TF32 as set.
        let benchmark = x.device().is_cuda() && self.cudnn_benchmark;
        for (i, (w, b)) in self.convs.iter().enumerate().take(deepest + 1) {
            // at::_convolution, which torch.conv2d calls with the global cuDNN flags: stride 1, padding 1,
            // dilation 1, not transposed, one group; not deterministic, cuDNN enabled.
            h = h
                .f_internal_convolution(
                    w,
                    Some(b),
                    [1, 1],
                    [1, 1],
                    [1, 1],
                    false,
                    [0, 0],
                    1,
                    benchmark,
                    false,
                    true,
                    self.tf32,
                )?
                .f_relu_()?;
            for (slot, layer) in out.iter_mut().zip(layers) {
                if layer.index() == i {
                    *slot = Some(h.shallow_clone());
                }
            }
            if i < deepest && POOL_AFTER.contains(&i) {
                h = match pooling {
                    Pooling::Max => h.f_max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)?,
                    Pooling::Avg => h.f_avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None)?,
                    Pooling::L2 => l2_pool(&h)?,
                };
            }
        }
        Ok(out.into_iter().flatten().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocessing_round_trips() {
        let img = RgbImage::from_fn(5, 4, |x, y| {
            image::Rgb([x as u8 * 50, y as u8 * 60, 255 - x as u8])
        });
        for p in [Preprocessing::Caffe, Preprocessing::Torchvision] {
            assert_eq!(
                p.deprocess(&p.preprocess(&img, Device::Cpu)).unwrap(),
                img,
                "{p:?}"
            );
        }
        // made grey in the input space: imaging::luminance's pixels (within its rounding)
        for p in [Preprocessing::Caffe, Preprocessing::Torchvision] {
            let grey = p
                .deprocess(&p.luminance(&p.preprocess(&img, Device::Cpu)))
                .unwrap();
            let expected = stylefarm_core::imaging::luminance(&img);
            let most = grey
                .as_raw()
                .iter()
                .zip(expected.as_raw())
                .map(|(&a, &b)| a.abs_diff(b))
                .max();
            assert!(most <= Some(1), "{p:?}: {most:?}");
        }
        // caffe: BGR minus the mean
        let x = Preprocessing::Caffe.preprocess(&img, Device::Cpu);
        let v = |c: i64| x.double_value(&[0, c, 1, 2]);
        let px = img.get_pixel(2, 1).0;
        assert!((v(0) - (px[2] as f64 - 103.939)).abs() < 1e-4);
        assert!((v(2) - (px[0] as f64 - 123.68)).abs() < 1e-4);
    }

    /// L2 pooling's values (a 2x2 window's root sum of squares, times 0.78) and its gradient: finite where
    /// a window is all zeros (0 there), as torch's LPPool2d after a ReLU.
    #[test]
    fn l2_pooling_is_the_scaled_root_sum_of_squares_with_a_finite_gradient() {
        let x = Tensor::from_slice(&[3.0f32, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
            .reshape([1, 1, 2, 4])
            .set_requires_grad(true);
        let y = l2_pool(&x).unwrap();
        assert_eq!(y.size(), [1, 1, 1, 2]);
        let (a, b) = (y.double_value(&[0, 0, 0, 0]), y.double_value(&[0, 0, 0, 1]));
        assert!((a - 5.0 * 0.78).abs() < 1e-5 && b == 0.0, "{a} {b}");
        y.sum(Kind::Float).backward();
        let g = Vec::<f32>::try_from(x.grad().flatten(0, -1)).unwrap();
        // d/dx of 0.78 sqrt(x1^2 + x2^2) = 0.78 x / 5 in the first window; 0 in the zero window
        let want = [
            0.78 * 3.0 / 5.0,
            0.78 * 4.0 / 5.0,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
        ];
        for (k, (g, w)) in g.iter().zip(want).enumerate() {
            assert!(
                g.is_finite() && (f64::from(*g) - w).abs() < 1e-5,
                "{k}: {g} vs {w}"
            );
        }
    }

    #[test]
    fn missing_weights_say_how_to_get_them() {
        let err = Vgg19::load(Path::new("/nonexistent/vgg.safetensors"), Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("/nonexistent/vgg.safetensors") && err.contains("deploy/setup.sh"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.safetensors");
        std::fs::write(&bad, b"garbage!garbage").unwrap();
        assert!(Vgg19::load(&bad, Device::Cpu).is_err());
    }
}
