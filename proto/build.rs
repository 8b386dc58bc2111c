//! Generates the stylefarm.v1 code with tonic-prost-build, using the protoc binary vendored by the
//! protoc-bin-vendored crate (no system protoc needed), writes the file descriptor set for reflection, and
//! counts the render protocol's revision (`PROTOCOL`, in `protocol.rs`) from `protocol.lock`, which it
//! checks against the descriptor.
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use prost::Message;
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorSet};

/// The service whose answers are what a coordinator tells its workers.
const WORKER_SERVICE: &str = "WorkerService";
/// Every field and enum value a coordinator has ever sent its workers, one a line, added to and never
/// taken from: its line count is the render protocol's revision.
const LOCK: &str = "protocol.lock";

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
    println!("cargo:rerun-if-changed={LOCK}");
    let set = FileDescriptorSet::decode(std::fs::read(&descriptor)?.as_slice())?;
    let lock = std::fs::read_to_string(LOCK)?;
    let locked: BTreeSet<&str> = lock
        .lines()
        .map(|l| l.trim().trim_start_matches('\u{feff}'))
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    // every line counts, so each must be one a build wrote: `<.type> <number> <name>`, single spaces
    for line in &locked {
        let parts: Vec<&str> = line.split(' ').collect();
        let name =
            |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        let well_formed = matches!(parts[..], [ty, number, field]
            if ty.starts_with('.') && ty[1..].split('.').all(name)
                && number.parse::<i32>().is_ok() && name(field));
        if !well_formed {
            return Err(
                format!("{LOCK}: '{line}' is not `<.package.Type> <number> <name>`").into(),
            );
        }
    }
    let missing: Vec<String> = sent_to_workers(&set)?
        .into_iter()
        .filter(|line| !locked.contains(line.as_str()))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "{LOCK} lacks what a coordinator now sends its workers; append these lines to it (that raises \
             stylefarm_proto::PROTOCOL, so that coordinators refuse the workers built before them, which \
             would drop these fields without an error):\n{}",
            missing.join("\n")
        )
        .into());
    }
    let protocol = locked.len();
    std::fs::write(
        out.join("protocol.rs"),
        format!(
            "/// This build's render protocol revision, as the module says.\npub const PROTOCOL: u32 = \
             {protocol};\n"
        ),
    )?;
    Ok(())
}

/// A line for each field and enum value of the messages and enums that the worker service's answers hold,
/// directly or nested: `<type> <number> <name>`, e.g. `.stylefarm.v1.RenderParams 26 match_colors`. Types
/// of other packages (google.protobuf's) are left out.
fn sent_to_workers(set: &FileDescriptorSet) -> Result<Vec<String>, String> {
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
    for file in set.file.iter().filter(|f| f.package() == "stylefarm.v1") {
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
    let (mut seen, mut lines) = (BTreeSet::new(), BTreeSet::new());
    while let Some(name) = roots.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        if let Some(e) = enums.get(&name) {
            lines.extend(
                e.value
                    .iter()
                    .map(|v| (name.clone(), v.number(), v.name().to_string())),
            );
        } else if let Some(message) = messages.get(&name) {
            lines.extend(
                message
                    .field
                    .iter()
                    .map(|f| (name.clone(), f.number(), f.name().to_string())),
            );
            roots.extend(message.field.iter().filter_map(|f| f.type_name.clone()));
        }
    }
    // by type, then number
    Ok(lines
        .into_iter()
        .map(|(name, number, field)| format!("{name} {number} {field}"))
        .collect())
}
