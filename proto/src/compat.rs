//! What a peer built from an older `stylefarm.v1` would drop of a message: the fields set in it that the
//! peer's descriptor (read from its gRPC server reflection) lacks. Protobuf skips unknown fields without an
//! error, so a client newer than its coordinator would otherwise have a new render option ignored and the
//! job rendered without it. Workers are held to their coordinator by [`crate::PROTOCOL`] instead.

use std::collections::{BTreeSet, HashMap};
use std::sync::OnceLock;

use prost::Message;
pub use prost_reflect::DescriptorPool;
use prost_reflect::{DynamicMessage, ReflectMessage, UnknownField, Value};
use prost_types::FileDescriptorProto;

/// This build's descriptors ([`crate::FILE_DESCRIPTOR_SET`]), which name the fields a peer lacks.
fn ours() -> &'static DescriptorPool {
    static OURS: OnceLock<DescriptorPool> = OnceLock::new();
    OURS.get_or_init(|| {
        DescriptorPool::decode(crate::FILE_DESCRIPTOR_SET)
            .expect("the descriptor set protoc wrote at build time decodes")
    })
}

/// A peer's descriptors from the encoded `FileDescriptorProto`s its server reflection answered with (a file
/// and its dependencies, as `FileDescriptorResponse.file_descriptor_proto`).
pub fn pool_of(files: &[Vec<u8>]) -> Result<DescriptorPool, String> {
    let files = files
        .iter()
        .map(|bytes| FileDescriptorProto::decode(bytes.as_slice()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("a file descriptor does not decode: {e}"))?;
    let mut pool = DescriptorPool::new();
    pool.add_file_descriptor_protos(files)
        .map_err(|e| format!("the file descriptors do not form a whole: {e}"))?;
    Ok(pool)
}

/// The fields set in `message`, of the type named `name` (e.g. `stylefarm.v1.SubmitJobRequest`), nested
/// messages' included, that `theirs` does not know and that hold something other than the defaults: a
/// message of a type named in `defaults` (type name, an encoded instance holding its defaults) whose unknown
/// field holds what that instance holds there loses nothing by its being dropped (the peer's default is the
/// behaviour the field's default keeps). As `Message.field (number)`, named from this build's descriptors,
/// sorted; empty when `theirs` knows every one. An error when `theirs` lacks one of the types.
pub fn unknown_to(
    theirs: &DescriptorPool,
    name: &str,
    message: &impl Message,
    defaults: &[(&str, Vec<u8>)],
) -> Result<Vec<String>, String> {
    let decode = |name: &str, bytes: &[u8]| {
        let descriptor = theirs
            .get_message_by_name(name)
            .ok_or_else(|| format!("it has no message {name}"))?;
        DynamicMessage::decode(descriptor, bytes)
            .map_err(|e| format!("{name} does not decode against its descriptor: {e}"))
    };
    let defaults = defaults
        .iter()
        .map(|(name, bytes)| Ok((name.to_string(), decode(name, bytes)?)))
        .collect::<Result<HashMap<String, DynamicMessage>, String>>()?;
    let decoded = decode(name, &message.encode_to_vec())?;
    let mut found = BTreeSet::new();
    walk(&decoded, &defaults, &mut found);
    Ok(found.into_iter().collect())
}

/// Adds `message`'s unknown fields that differ from its type's `defaults` to `found`, then those of the
/// messages it holds.
fn walk(
    message: &DynamicMessage,
    defaults: &HashMap<String, DynamicMessage>,
    found: &mut BTreeSet<String>,
) {
    let descriptor = message.descriptor();
    let default = defaults.get(descriptor.full_name());
    // a field's entries (a repeated field has several), in the message and in its default
    let entries = |m: &DynamicMessage, number: u32| -> Vec<UnknownField> {
        m.unknown_fields()
            .filter(|u| u.number() == number)
            .cloned()
            .collect()
    };
    let numbers: BTreeSet<u32> = message.unknown_fields().map(UnknownField::number).collect();
    for number in numbers {
        if default.is_some_and(|d| entries(d, number) == entries(message, number)) {
            continue;
        }
        let field = ours()
            .get_message_by_name(descriptor.full_name())
            .and_then(|m| m.get_field(number))
            .map_or_else(|| "?".to_string(), |f| f.name().to_string());
        found.insert(format!("{}.{field} ({number})", descriptor.name()));
    }
    for (_, value) in message.fields() {
        visit(value, defaults, found);
    }
}

fn visit(value: &Value, defaults: &HashMap<String, DynamicMessage>, found: &mut BTreeSet<String>) {
    match value {
        Value::Message(message) => walk(message, defaults, found),
        Value::List(values) => values.iter().for_each(|v| visit(v, defaults, found)),
        Value::Map(entries) => entries.values().for_each(|v| visit(v, defaults, found)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;
    use prost_types::{DescriptorProto, FileDescriptorSet};

    const SUBMIT: &str = "stylefarm.v1.SubmitJobRequest";

    /// A peer of this build's files with `strip` applied to each top-level message (an older peer).
    fn peer(strip: impl Fn(&mut DescriptorProto)) -> DescriptorPool {
        let mut set = FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET).unwrap();
        let files: Vec<Vec<u8>> = set
            .file
            .iter_mut()
            .map(|file| {
                file.message_type.iter_mut().for_each(&strip);
                file.encode_to_vec()
            })
            .collect();
        pool_of(&files).unwrap()
    }

    /// A peer that predates a render option and the `paused` flag: a request that sets them names both
    /// (nested in the spec's params, and at the top); one that leaves them unset, and this build, none.
    #[test]
    fn fields_a_peer_lacks_are_named_where_they_are_set() {
        let older = peer(|m| {
            let gone = match m.name() {
                "RenderParams" => "match_colors",
                "SubmitJobRequest" => "paused",
                _ => return,
            };
            m.field.retain(|f| f.name() != gone);
        });
        let request = |match_colors: Option<bool>, paused: bool| pb::SubmitJobRequest {
            spec: Some(pb::JobSpec {
                params: Some(pb::RenderParams {
                    match_colors,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            paused,
            ..Default::default()
        };
        let unknown = |peer: &DescriptorPool, request: &pb::SubmitJobRequest, defaults| {
            unknown_to(peer, SUBMIT, request, defaults).unwrap()
        };
        assert_eq!(
            unknown(&older, &request(Some(true), true), &[]),
            [
                "RenderParams.match_colors (26)",
                "SubmitJobRequest.paused (3)"
            ]
        );
        // an optional field set to its default is still sent, and still unknown, unless the defaults are
        // given: the peer's behaviour is the default's, nothing is lost
        assert_eq!(
            unknown(&older, &request(Some(false), false), &[]),
            ["RenderParams.match_colors (26)"]
        );
        let defaults = [(
            "stylefarm.v1.RenderParams",
            pb::RenderParams {
                match_colors: Some(false),
                ..Default::default()
            }
            .encode_to_vec(),
        )];
        assert!(unknown(&older, &request(Some(false), false), &defaults).is_empty());
        assert_eq!(
            unknown(&older, &request(Some(true), false), &defaults),
            ["RenderParams.match_colors (26)"]
        );
        assert!(unknown(&older, &request(None, false), &[]).is_empty());
        let same = peer(|_| {});
        assert!(unknown(&same, &request(Some(true), true), &[]).is_empty());
        // a peer without the message at all
        let none = pool_of(&[]).unwrap();
        let error = unknown_to(&none, SUBMIT, &request(None, false), &[]).unwrap_err();
        assert!(error.contains("stylefarm.v1.SubmitJobRequest"), "{error}");
    }
}
