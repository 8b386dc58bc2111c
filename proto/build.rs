//! Generates the stylefarm.v1 code with tonic-prost-build, using the protoc binary vendored by the
//! protoc-bin-vendored crate (no system protoc needed), writes the file descriptor set for reflection, and
//! counts the render protocol's revision from it (`PROTOCOL`, in `protocol.rs`).
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use prost::Message;
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorSet};

/// The service whose answers are what a coordinator tells its workers.
const WORKER_SERVICE: &str = "WorkerService";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["stylefarm/v1/stylefarm.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    // SAFETY: the build script is single-threaded; protoc's location is set before any code generation.
    unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor = out.join("stylefarm_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptor)
        .compile_protos(&protos, &["."])?;
    let set = FileDescriptorSet::decode(std::fs::read(&descriptor)?.as_slice())?;
    let protocol = protocol(&set)?;
    std::fs::write(
        out.join("protocol.rs"),
        format!(
            "/// This build's render protocol revision, as the module says.\npub const PROTOCOL: u32 = \
             {protocol};\n"
        ),
    )?;
    Ok(())
}

/// The field numbers (fields and reserved ones) and enum values, summed over the messages and enums that
/// the worker service's answers hold, directly or nested: adding a field or a value there raises it, and
/// reserving a removed one keeps it (protobuf's rules for changing a message).
fn protocol(set: &FileDescriptorSet) -> Result<u32, String> {
    let mut messages: HashMap<String, &DescriptorProto> = HashMap::new();
    let mut enums: HashMap<String, &EnumDescriptorProto> = HashMap::new();
    fn index<'a>(
        scope: &str,
        message: &'a DescriptorProto,
        messages: &mut HashMap<String, &'a DescriptorProto>,
        enums: &mut HashMap<String, &'a EnumDescriptorProto>,
    ) {
        let name = format!("{scope}.{}", message.name());
        for nested in &message.nested_type {
            index(&name, nested, messages, enums);
        }
        for e in &message.enum_type {
            enums.insert(format!("{name}.{}", e.name()), e);
        }
        messages.insert(name, message);
    }
    let mut roots = Vec::new();
    for file in &set.file {
        let scope = format!(".{}", file.package());
        for message in &file.message_type {
            index(&scope, message, &mut messages, &mut enums);
        }
        for e in &file.enum_type {
            enums.insert(format!("{scope}.{}", e.name()), e);
        }
        for service in file.service.iter().filter(|s| s.name() == WORKER_SERVICE) {
            roots.extend(service.method.iter().map(|m| m.output_type().to_string()));
        }
    }
    if roots.is_empty() {
        return Err(format!("no service {WORKER_SERVICE} in the descriptor set"));
    }
    let (mut seen, mut count) = (BTreeSet::new(), 0u64);
    while let Some(name) = roots.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        if let Some(e) = enums.get(&name) {
            count += e.value.len() as u64;
            continue;
        }
        // a type of another package (google.protobuf's) is not ours to count
        let Some(message) = messages.get(&name) else {
            continue;
        };
        let mut numbers: BTreeSet<i32> = message.field.iter().map(|f| f.number()).collect();
        for range in &message.reserved_range {
            // end is exclusive; `to max` would be half a billion numbers: a removed field counts once
            numbers.extend((range.start()..range.end()).take(1000));
        }
        count += numbers.len() as u64;
        roots.extend(message.field.iter().filter_map(|f| f.type_name.clone()));
    }
    u32::try_from(count).map_err(|_| format!("{count} field numbers"))
}
