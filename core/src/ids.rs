//! The farm's ids, so that one kind of id cannot be passed where another is expected: [`JobId`],
//! [`LeaseId`] and [`WorkerId`] as newtypes over [`String`], each serialized as its bare string
//! (`serde(transparent)`), comparing with `str` and `String` and borrowing as `str` (maps keyed by an id
//! can be looked up by a string); [`TaskId`], a job's id and a task's index in it; [`ImageHash`], the
//! sha256 that names an image.

/// Defines a newtype over [`String`] with its conversions, comparisons and borrows.
macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Debug,
            Clone,
            PartialEq,
            Eq,
            PartialOrd,
            Ord,
            Hash,
            Default,
            serde::Serialize,
            serde::Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// The id with this text.
            pub fn new(id: impl Into<String>) -> Self {
                $name(id.into())
            }

            /// The id's text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// Whether the id is empty (none was given).
            pub fn is_empty(&self) -> bool {
                self.0.is_empty()
            }
        }

        /// Writes the id's text as it is.
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        /// The id with this text.
        impl From<String> for $name {
            fn from(id: String) -> Self {
                $name(id)
            }
        }

        /// The id with this text.
        impl From<&str> for $name {
            fn from(id: &str) -> Self {
                $name(id.to_string())
            }
        }

        /// The id's text.
        impl From<$name> for String {
            fn from(id: $name) -> Self {
                id.0
            }
        }

        /// The id's text: a map keyed by the id can be looked up by a `&str`.
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        /// The id's text.
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        /// Whether the id's text is this string.
        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        /// Whether the id's text is this string.
        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        /// Whether the id's text is this string.
        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }
    };
}

string_id! {
    /// A job's id as the coordinator assigns it at submission: `job-` and hex digits. It keys the job in the
    /// coordinator's store.
    JobId
}

/// The longest job id a client may name ([`JobId::checked`]); the coordinator's are `job-` and at most 16
/// hex digits.
pub const MAX_JOB_ID_CHARS: usize = 64;

impl JobId {
    /// The id a client names, e.g. another job's in [`crate::job::JobSpec::after`]: 1 to
    /// [`MAX_JOB_ID_CHARS`] letters, digits, `-` or `_`; else an error naming `field`.
    pub fn checked(field: &'static str, text: &str) -> Result<JobId, crate::Error> {
        let fine = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if text.is_empty() || text.len() > MAX_JOB_ID_CHARS || !text.chars().all(fine) {
            let shown: String = text.chars().take(MAX_JOB_ID_CHARS).collect();
            return Err(crate::Error::invalid(
                field,
                format!(
                    "'{shown}' is no job id (1 to {MAX_JOB_ID_CHARS} letters, digits, '-' or '_')"
                ),
            ));
        }
        Ok(JobId::new(text))
    }
}

string_id! {
    /// A lease's id: the fencing token a worker names in its heartbeats, its result and its failure. Once the
    /// lease has expired or its task been reported, whatever names it is discarded.
    LeaseId
}

string_id! {
    /// A worker's id as the coordinator assigns it at registration: the worker's name, `#` and a number
    /// (`name#n`).
    WorkerId
}

/// Longest worker name, in bytes (and longest device or version text a worker registers with).
pub const MAX_WORKER_NAME: usize = 200;

/// Refuses a worker name that is empty, longer than [`MAX_WORKER_NAME`] bytes or holds a control character
/// (the workers are listed one a line), naming `field`.
pub fn check_worker_name(field: &'static str, name: &str) -> Result<(), crate::Error> {
    if name.is_empty() || name.len() > MAX_WORKER_NAME || name.contains(char::is_control) {
        return Err(crate::Error::invalid(
            field,
            format!("1 to {MAX_WORKER_NAME} bytes without control characters"),
        ));
    }
    Ok(())
}

impl WorkerId {
    /// The worker's name as an id: this id without its `#n` (the coordinator gives each registration of a
    /// name an id of its own; an id without `#` is its own name). What a worker's strikes and reports on a
    /// job count by, so that a worker that registers again, e.g. after losing its connection, keeps them.
    pub fn by_name(&self) -> WorkerId {
        match self.0.rsplit_once('#') {
            Some((name, _)) => WorkerId::new(name),
            None => self.clone(),
        }
    }
}

/// A task of a job: the job's id and the task's index in it, written `job/index`.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct TaskId {
    /// The job the task belongs to.
    pub job: JobId,
    /// The task's 0-based index in its job.
    pub index: u32,
}

impl std::fmt::Display for TaskId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.job, self.index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap};

    #[test]
    fn ids_are_their_text() {
        let id = JobId::new("job-1a");
        assert_eq!(id.as_str(), "job-1a");
        assert_eq!(id.to_string(), "job-1a");
        assert_eq!(id, "job-1a");
        assert_eq!(id, *"job-1a");
        assert_eq!(id, String::from("job-1a"));
        assert_eq!(String::from(id.clone()), "job-1a");
        assert_eq!(JobId::from("job-1a"), id);
        assert_eq!(JobId::from(String::from("job-1a")), id);
        assert!(!id.is_empty());
        assert!(WorkerId::default().is_empty());
        assert_eq!([LeaseId::new("a"), LeaseId::new("b")], ["a", "b"]);
        let task = TaskId { job: id, index: 3 };
        assert_eq!(task.to_string(), "job-1a/3");
    }

    #[test]
    fn a_worker_id_without_its_registration_number_is_its_name() {
        assert_eq!(WorkerId::new("gpu-3#17").by_name(), "gpu-3");
        assert_eq!(WorkerId::new("a#b#2").by_name(), "a#b");
        assert_eq!(WorkerId::new("w1").by_name(), "w1");
    }

    #[test]
    fn maps_keyed_by_ids_look_up_by_str() {
        let mut strikes = BTreeMap::new();
        strikes.insert(WorkerId::new("w#1"), 2u32);
        assert_eq!(strikes["w#1"], 2);
        let mut leases = HashMap::new();
        leases.insert(LeaseId::new("lease-1"), 3u32);
        assert_eq!(leases.get("lease-1"), Some(&3));
    }

    #[test]
    fn ids_serialize_as_bare_strings() {
        let strikes: BTreeMap<WorkerId, u32> = [(WorkerId::new("w#1"), 2)].into();
        let plain: BTreeMap<String, u32> = [("w#1".to_string(), 2)].into();
        assert_eq!(
            serde_json::to_string(&strikes).unwrap(),
            serde_json::to_string(&plain).unwrap()
        );
        let id: JobId = serde_json::from_str("\"job-1a\"").unwrap();
        assert_eq!(id, "job-1a");
    }
}

/// The sha256 of an image's bytes, lowercase hex: how the farm names images.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct ImageHash(String);

impl ImageHash {
    /// The 64 lowercase hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> ImageHash {
        use sha2::Digest;
        ImageHash(hex(&sha2::Sha256::digest(bytes)))
    }
}

/// `bytes` as lowercase hex digits, two a byte.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl std::str::FromStr for ImageHash {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self, crate::Error> {
        if s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(ImageHash(s.to_string()))
        } else {
            Err(crate::Error::invalid(
                "image",
                format!("'{s}' is not a sha256 (64 lowercase hex digits)"),
            ))
        }
    }
}

impl TryFrom<String> for ImageHash {
    type Error = crate::Error;
    fn try_from(s: String) -> Result<Self, crate::Error> {
        s.parse()
    }
}

impl From<ImageHash> for String {
    fn from(h: ImageHash) -> String {
        h.0
    }
}

impl std::fmt::Display for ImageHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
