//! Conversion between the wire types of stylefarm-proto and the domain types, at the edge: a missing or bad
//! field becomes [`Error::Invalid`] naming it (the servers map that to INVALID_ARGUMENT).

use std::path::PathBuf;

use stylefarm_proto::pb;

use crate::job::{ExpandedJob, ImageHash, JobKind, JobSpec, SweepAxis, TileTask};
use crate::params::{render_options, Init, Layer, Optimizer, Pooling, RenderParams};
use crate::tiling::{Rect, Tiling, DEFAULT_OVERLAP, MIN_TILE_SIZE};
use crate::Error;

fn hashes(field: &'static str, values: Vec<String>) -> Result<Vec<ImageHash>, Error> {
    values
        .into_iter()
        .map(|v| {
            v.parse::<ImageHash>()
                .map_err(|_| Error::invalid(field, format!("'{v}' is not a sha256")))
        })
        .collect()
}

/// A render option's type on the wire: `optional` scalars (unset: the default), repeated lists (empty: the
/// default), proto enums. The table of `render_options!` pairs each option with its proto field of the same
/// name through this trait; a field of the wrong type does not compile.
trait WireValue: Sized {
    /// The proto field's Rust type.
    type Wire;
    /// The domain value of a field, `default` when unset; errors name `field`.
    fn from_wire(field: &'static str, wire: Self::Wire, default: Self) -> Result<Self, Error>;
    /// The field for a domain value (always set).
    fn to_wire(&self) -> Self::Wire;
}

macro_rules! optional_scalar {
    ($($ty:ty),*) => {$(
        impl WireValue for $ty {
            type Wire = Option<$ty>;
            fn from_wire(_: &'static str, wire: Option<$ty>, default: $ty) -> Result<$ty, Error> {
                Ok(wire.unwrap_or(default))
            }
            fn to_wire(&self) -> Option<$ty> {
                Some(*self)
            }
        }
    )*};
}
optional_scalar!(u32, u64, f64, bool);

macro_rules! repeated_scalar {
    ($($ty:ty),*) => {$(
        impl WireValue for Vec<$ty> {
            type Wire = Vec<$ty>;
            fn from_wire(_: &'static str, wire: Vec<$ty>, default: Vec<$ty>) -> Result<Vec<$ty>, Error> {
                Ok(if wire.is_empty() { default } else { wire })
            }
            fn to_wire(&self) -> Vec<$ty> {
                self.clone()
            }
        }
    )*};
}
repeated_scalar!(u32, f64);

impl WireValue for Vec<Layer> {
    type Wire = Vec<String>;
    fn from_wire(field: &'static str, wire: Vec<String>, default: Self) -> Result<Self, Error> {
        if wire.is_empty() {
            return Ok(default);
        }
        wire.iter()
            .map(|v| {
                v.parse::<Layer>()
                    .map_err(|e| Error::invalid(field, e.to_string()))
            })
            .collect()
    }
    fn to_wire(&self) -> Vec<String> {
        self.iter().map(ToString::to_string).collect()
    }
}

/// A proto enum with its domain type: `UNSPECIFIED` (or unset) is the default, an unknown number an error.
macro_rules! proto_enum {
    ($ty:ty, $pb:ty, $($variant:ident),+) => {
        impl WireValue for $ty {
            type Wire = Option<i32>;
            fn from_wire(field: &'static str, wire: Option<i32>, default: $ty) -> Result<$ty, Error> {
                match wire.map(<$pb>::try_from) {
                    None | Some(Ok(<$pb>::Unspecified)) => Ok(default),
                    $(Some(Ok(<$pb>::$variant)) => Ok(<$ty>::$variant),)+
                    Some(Err(_)) => Err(Error::invalid(
                        field,
                        format!(
                            "unknown value {} (expected one of: {})",
                            wire.unwrap_or_default(),
                            [$(<$ty>::$variant.to_string()),+].join(", ")
                        ),
                    )),
                }
            }
            fn to_wire(&self) -> Option<i32> {
                Some(match self {
                    $(<$ty>::$variant => <$pb>::$variant as i32,)+
                })
            }
        }
    };
}
proto_enum!(Optimizer, pb::Optimizer, Lbfgs, Adam);
proto_enum!(Pooling, pb::Pooling, Max, Avg);

/// The init of a farm job: `content`, `noise`, or `image:<sha256>` of an uploaded image, which the domain
/// holds as [`Init::Image`] with the hash as its path.
impl WireValue for Init {
    type Wire = Option<String>;
    fn from_wire(field: &'static str, wire: Option<String>, default: Init) -> Result<Init, Error> {
        match wire.as_deref() {
            None => Ok(default),
            Some("content") => Ok(Init::Content),
            Some("noise") => Ok(Init::Noise),
            Some(other) => match other.strip_prefix("image:").map(str::parse::<ImageHash>) {
                Some(Ok(hash)) => Ok(Init::Image(PathBuf::from(hash.as_str()))),
                _ => Err(Error::invalid(
                    field,
                    format!("'{other}': expected content, noise or image:<sha256>"),
                )),
            },
        }
    }
    fn to_wire(&self) -> Option<String> {
        Some(match self {
            Init::Content => "content".into(),
            Init::Noise => "noise".into(),
            Init::Image(path) => format!("image:{}", path.display()),
        })
    }
}

/// Both directions of `RenderParams`, field by field from the options' table.
macro_rules! params_wire {
    ($(
        $(#[doc = $doc:literal])*
        $name:ident: $ty:ty = $default:expr, $range:expr, sweep: $sweep:literal;
    )*) => {
        impl TryFrom<pb::RenderParams> for RenderParams {
            type Error = Error;

            /// Unset fields take the defaults. The result is not validated against a style count:
            /// [`JobSpec::tasks`] does that.
            fn try_from(p: pb::RenderParams) -> Result<Self, Error> {
                let d = RenderParams::default();
                Ok(RenderParams {
                    $($name: WireValue::from_wire(stringify!($name), p.$name, d.$name)?,)*
                })
            }
        }

        impl From<&RenderParams> for pb::RenderParams {
            fn from(p: &RenderParams) -> Self {
                pb::RenderParams {
                    $($name: WireValue::to_wire(&p.$name),)*
                }
            }
        }
    };
}
render_options!(params_wire);

impl TryFrom<pb::JobSpec> for JobSpec {
    type Error = Error;

    /// Converts and checks: the spec must expand into valid tasks.
    fn try_from(s: pb::JobSpec) -> Result<Self, Error> {
        Ok(ExpandedJob::try_from(s)?.into_parts().0)
    }
}

impl TryFrom<pb::JobSpec> for ExpandedJob {
    type Error = Error;

    /// Converts, checks and expands the spec into its tasks: the one expansion of a submission.
    fn try_from(s: pb::JobSpec) -> Result<Self, Error> {
        let kind = match pb::JobKind::try_from(s.kind) {
            Ok(pb::JobKind::Single) => JobKind::Single,
            Ok(pb::JobKind::Batch) => JobKind::Batch,
            Ok(pb::JobKind::Sweep) => JobKind::Sweep,
            Ok(pb::JobKind::Tiled) => JobKind::Tiled,
            _ => {
                return Err(Error::invalid(
                    "kind",
                    format!(
                        "{} is not a job kind (single, batch, sweep or tiled)",
                        s.kind
                    ),
                ))
            }
        };
        let sweep = s
            .sweep
            .into_iter()
            .map(|a| {
                Ok(SweepAxis {
                    parameter: a.parameter.parse()?,
                    values: a.values,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let spec = JobSpec {
            kind,
            contents: hashes("contents", s.contents)?,
            styles: hashes("styles", s.styles)?,
            params: s
                .params
                .ok_or_else(|| Error::invalid("params", "missing"))
                .and_then(RenderParams::try_from)?,
            sweep,
            priority: s.priority,
            max_attempts: s.max_attempts,
            // 0: the planner's (tile size) or the default (overlap)
            tiling: Tiling::new(
                Some(s.tile_size).filter(|&t| t != 0),
                if s.overlap == 0 {
                    DEFAULT_OVERLAP
                } else {
                    s.overlap
                },
                s.exact_tiles,
            ),
        };
        spec.expand()
    }
}

impl From<&JobSpec> for pb::JobSpec {
    fn from(s: &JobSpec) -> Self {
        pb::JobSpec {
            kind: match s.kind {
                JobKind::Single => pb::JobKind::Single,
                JobKind::Batch => pb::JobKind::Batch,
                JobKind::Sweep => pb::JobKind::Sweep,
                JobKind::Tiled => pb::JobKind::Tiled,
            } as i32,
            contents: s.contents.iter().map(ToString::to_string).collect(),
            styles: s.styles.iter().map(ToString::to_string).collect(),
            params: Some((&s.params).into()),
            sweep: s
                .sweep
                .iter()
                .map(|a| pb::SweepAxis {
                    parameter: a.parameter.name().into(),
                    values: a.values.clone(),
                })
                .collect(),
            priority: s.priority,
            max_attempts: s.max_attempts,
            tile_size: s.tiling.fixed_tile_size().unwrap_or(0),
            overlap: s.tiling.overlap,
            exact_tiles: s.tiling.exact,
        }
    }
}

impl From<&TileTask> for pb::TileTask {
    fn from(t: &TileTask) -> Self {
        pb::TileTask {
            scale: t.scale,
            scales: t.scales,
            tile: t.tile,
            tiles: t.tiles,
            canvas_width: t.canvas_width,
            canvas_height: t.canvas_height,
            x: t.rect.x,
            y: t.rect.y,
            width: t.rect.width,
            height: t.rect.height,
            tile_size: t.tile_size,
            exact: t.exact,
        }
    }
}

impl TryFrom<pb::TileTask> for TileTask {
    type Error = Error;

    /// Converts and checks that the tile lies inside its canvas.
    fn try_from(t: pb::TileTask) -> Result<Self, Error> {
        let inside = t.width > 0
            && t.height > 0
            && u64::from(t.x) + u64::from(t.width) <= u64::from(t.canvas_width)
            && u64::from(t.y) + u64::from(t.height) <= u64::from(t.canvas_height);
        if t.tile_size < MIN_TILE_SIZE {
            return Err(Error::invalid(
                "tile_size",
                format!("must be at least {MIN_TILE_SIZE}, got {}", t.tile_size),
            ));
        }
        if !inside || t.scale >= t.scales || t.tile >= t.tiles {
            return Err(Error::invalid(
                "tile",
                format!(
                    "tile {}/{} of scale {}/{}: {}x{} at {},{} is not inside the {}x{} canvas",
                    t.tile,
                    t.tiles,
                    t.scale,
                    t.scales,
                    t.width,
                    t.height,
                    t.x,
                    t.y,
                    t.canvas_width,
                    t.canvas_height
                ),
            ));
        }
        Ok(TileTask {
            scale: t.scale,
            scales: t.scales,
            tile: t.tile,
            tiles: t.tiles,
            canvas_width: t.canvas_width,
            canvas_height: t.canvas_height,
            rect: Rect {
                x: t.x,
                y: t.y,
                width: t.width,
                height: t.height,
            },
            tile_size: t.tile_size,
            exact: t.exact,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::parse_sweep;

    fn spec() -> JobSpec {
        JobSpec {
            kind: JobKind::Sweep,
            contents: vec![ImageHash::of(b"c")],
            styles: vec![ImageHash::of(b"s1"), ImageHash::of(b"s2")],
            params: RenderParams {
                size: 128,
                init: Init::Image(ImageHash::of(b"i").to_string().into()),
                ..Default::default()
            },
            sweep: parse_sweep("style_weight=10,100;style_blend=0.7:0.3").unwrap(),
            priority: 3,
            max_attempts: 2,
            tiling: Tiling::default(),
        }
    }

    #[test]
    fn job_specs_round_trip() {
        let s = spec();
        let wire: pb::JobSpec = (&s).into();
        assert_eq!(JobSpec::try_from(wire).unwrap(), s);
    }

    /// The edge's one expansion gives the spec and the tasks that expanding the spec gives.
    #[test]
    fn a_wire_spec_expands_once_into_its_tasks() {
        let s = spec();
        let job = ExpandedJob::try_from(pb::JobSpec::from(&s)).unwrap();
        assert_eq!(job.spec(), &s);
        assert_eq!(job.tasks(), s.tasks().unwrap().as_slice());
        assert_eq!(job.tasks().len(), 2, "a sweep of 2 x 1 points");
    }

    #[test]
    fn unset_params_take_the_defaults() {
        assert_eq!(
            RenderParams::try_from(pb::RenderParams::default()).unwrap(),
            RenderParams::default()
        );
    }

    #[test]
    fn bad_wire_values_name_the_field() {
        let bad = |f: &dyn Fn(&mut pb::JobSpec), field: &str| {
            let mut wire: pb::JobSpec = (&spec()).into();
            f(&mut wire);
            let err = JobSpec::try_from(wire).unwrap_err().to_string();
            assert!(err.starts_with(field), "{field}: {err}");
        };
        bad(&|w| w.kind = 9, "kind");
        bad(&|w| w.contents = vec!["nope".into()], "contents");
        bad(&|w| w.params = None, "params");
        bad(&|w| w.params.as_mut().unwrap().size = Some(0), "size");
        bad(
            &|w| w.params.as_mut().unwrap().content_weight = Some(f64::NAN),
            "content_weight",
        );
        bad(
            &|w| w.params.as_mut().unwrap().optimizer = Some(99),
            "optimizer",
        );
        bad(
            &|w| w.params.as_mut().unwrap().init = Some("image:zz".into()),
            "init",
        );
        bad(
            &|w| w.params.as_mut().unwrap().style_layers = vec!["relu7_1".into()],
            "style_layers",
        );
        bad(&|w| w.sweep[0].parameter = "colour".into(), "sweep");
    }
}
