//! The VM descriptor.
//!
//! A descriptor is what a clone host needs to start a clone besides the
//! memory and disk contents, which are fetched (or mapped) separately:
//!
//! ```text
//! +----------------------+  fixed 32-byte header (zerocopy, little endian)
//! | magic "SFDESC01"     |
//! | version, flags       |
//! | meta_len, state_len, |
//! | holes_len, checksum  |
//! +----------------------+
//! | meta (JSON)          |  memory layout, generation, QEMU shape, network,
//! |                      |  ticket and clone slots
//! +----------------------+
//! | device state         |  QEMU migration stream with RAM left out
//! |                      |  (capability x-ignore-shared), ~50 KB
//! +----------------------+
//! | hole map             |  one bit per guest page, 1 = hole (zero page)
//! +----------------------+
//! ```
//!
//! Decoding validates the header, every length against [`MAX_DESCRIPTOR`],
//! the checksum and the metadata's internal consistency, so a descriptor
//! read from a file or the network cannot make the decoder panic or
//! allocate without bound.

use bitvec::prelude::*;
use serde::{Deserialize, Serialize};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Magic bytes at the start of every descriptor.
pub const MAGIC: [u8; 8] = *b"SFDESC01";
/// Current format version. Decoders accept this and `VERSION - 1`.
pub const VERSION: u16 = 1;
/// Upper bound on an encoded descriptor.
pub const MAX_DESCRIPTOR: usize = 16 << 20;
/// Guest page size the hole map is expressed in.
pub const PAGE_SIZE: u64 = 4096;

/// Fixed header of an encoded descriptor.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Header {
    pub magic: [u8; 8],
    pub version: u16,
    pub flags: u16,
    pub meta_len: u32,
    pub state_len: u32,
    pub holes_len: u32,
    /// FNV-1a 64 of everything after the header.
    pub checksum: u64,
}
const _: () = assert!(std::mem::size_of::<Header>() == 32);

/// Errors decoding or validating a descriptor.
#[derive(Debug, thiserror::Error)]
pub enum DescriptorError {
    /// Shorter than its header or than the lengths it announces.
    #[error("Descriptor is truncated")]
    Truncated,
    /// Larger than [`MAX_DESCRIPTOR`].
    #[error("Descriptor of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// The magic bytes are wrong: not a descriptor.
    #[error("Not a snowflock descriptor")]
    BadMagic,
    /// A format version this build does not read.
    #[error("Unsupported descriptor version {0}")]
    Version(u16),
    /// Contents do not match the checksum.
    #[error("Descriptor checksum mismatch")]
    Checksum,
    /// The metadata is not valid JSON of the expected shape.
    #[error("Malformed descriptor metadata")]
    Meta(#[source] serde_json::Error),
    /// The metadata is well formed but inconsistent.
    #[error("Invalid descriptor: {0}")]
    Invalid(String),
}

/// Guest memory layout and the frozen generation it refers to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    /// Guest RAM size in bytes (a multiple of [`PAGE_SIZE`]).
    pub size: u64,
    /// Generation number of the frozen memory, per parent VM.
    pub generation: u64,
    /// Host-independent reference to the frozen memory: `<host>:<gen id>`.
    pub source: String,
    /// Bytes of the generation that hold data (size minus holes).
    pub data_bytes: u64,
}

/// Shape of the VMM the clone must be started with. It must match the
/// parent's, or the device state will not load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineShape {
    pub vcpus: u32,
    pub mem_mib: u32,
    pub accel: String,
    /// Image directory (kernel and initramfs) the parent booted from.
    pub image: String,
    /// Kernel command line the parent booted with.
    pub cmdline: String,
}

/// The flock's private network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlockNet {
    /// Flock number (selects bridge, subnet and MAC range).
    pub flock: u32,
    /// `10.250.F.0/24`.
    pub subnet: String,
}

/// One clone to be created from this descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneSlot {
    pub clone_id: u32,
    pub vm: String,
    pub mac: String,
    pub ip_cidr: String,
}

/// Most layers a disk chain may have.
pub const MAX_DISK_LAYERS: usize = 64;
/// Most data extents one disk layer may list.
pub const MAX_DISK_EXTENTS: usize = 1 << 18;

/// One layer of the parent's frozen disk: a file served on demand by the
/// origin host's page service (like a memory generation), never written
/// again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskLayer {
    /// Host-independent reference: `<host>:<layer name>`.
    pub source: String,
    /// `raw` or `qcow2`.
    pub format: String,
    /// File size in bytes (a multiple of [`PAGE_SIZE`]).
    pub size: u64,
    /// Data extents `[start, end)` in bytes, page-aligned, sorted, disjoint;
    /// everything else in the file reads as zeros and is never fetched.
    pub data: Vec<(u64, u64)>,
}

/// The parent's disk at the clone instant: its layers, base first. A
/// clone's private overlay goes on top of the last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskLayout {
    /// Size of the disk the guest sees (bytes).
    pub virtual_size: u64,
    pub layers: Vec<DiskLayer>,
}

impl DiskLayout {
    fn validate(&self) -> Result<(), String> {
        if self.layers.is_empty() || self.layers.len() > MAX_DISK_LAYERS {
            return Err(format!("disk has {} layers", self.layers.len()));
        }
        if self.virtual_size == 0 {
            return Err("disk size is zero".into());
        }
        for (i, l) in self.layers.iter().enumerate() {
            if !matches!(l.format.as_str(), "raw" | "qcow2") || (i > 0 && l.format != "qcow2") {
                return Err(format!("disk layer {i} has format {:?}", l.format));
            }
            if l.size == 0 || !l.size.is_multiple_of(PAGE_SIZE) {
                return Err(format!(
                    "disk layer {i} size {} is not a positive multiple of 4 KiB",
                    l.size
                ));
            }
            if l.data.len() > MAX_DISK_EXTENTS {
                return Err(format!("disk layer {i} lists {} extents", l.data.len()));
            }
            let mut prev_end = 0;
            for &(a, b) in &l.data {
                let aligned = a.is_multiple_of(PAGE_SIZE) && b.is_multiple_of(PAGE_SIZE);
                if !aligned || a >= b || a < prev_end || b > l.size {
                    return Err(format!("disk layer {i} has a bad extent [{a}, {b})"));
                }
                prev_end = b;
            }
        }
        Ok(())
    }
}

/// Descriptor metadata (the JSON part).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub parent: String,
    pub origin_host: String,
    pub ticket: String,
    /// Agent request id of the pending `sf_clone` call in the guest.
    pub request_id: u64,
    pub memory: MemoryLayout,
    pub machine: MachineShape,
    pub net: FlockNet,
    pub clones: Vec<CloneSlot>,
    /// The frozen disk, for a parent with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskLayout>,
    /// UDP port of the multicast groups the origin's page server sends
    /// copies of the generation's pages (and disk blocks) to; `None`: it
    /// serves them by unicast only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcast_port: Option<u16>,
    /// The ticket asked for independence: clone hosts fetch the whole
    /// generation (and disk layers) in the background.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub complete: bool,
}

/// A decoded descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub meta: Meta,
    /// QEMU device state (migration stream without RAM).
    pub device_state: Vec<u8>,
    /// One bit per page; set = the page is a hole and reads as zeros.
    pub holes: BitVec<u64, Lsb0>,
}

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

impl Descriptor {
    /// Number of guest pages.
    pub fn pages(&self) -> u64 {
        self.meta.memory.size / PAGE_SIZE
    }

    /// Checks internal consistency.
    pub fn validate(&self) -> Result<(), DescriptorError> {
        let m = &self.meta;
        let inv = |s: String| Err(DescriptorError::Invalid(s));
        if m.memory.size == 0 || !m.memory.size.is_multiple_of(PAGE_SIZE) {
            return inv(format!(
                "memory size {} is not a positive multiple of 4 KiB",
                m.memory.size
            ));
        }
        if m.memory.size != u64::from(m.machine.mem_mib) << 20 {
            return inv("memory size disagrees with the machine shape".into());
        }
        if self.holes.len() as u64 != self.pages() {
            return inv(format!(
                "hole map has {} bits for {} pages",
                self.holes.len(),
                self.pages()
            ));
        }
        if m.machine.vcpus == 0 || m.machine.vcpus > 256 {
            return inv(format!("vcpus {} out of range", m.machine.vcpus));
        }
        if self.device_state.is_empty() {
            return inv("device state is empty".into());
        }
        if let Some(d) = &m.disk {
            d.validate().map_err(DescriptorError::Invalid)?;
        }
        let mut seen = std::collections::HashSet::new();
        for c in &m.clones {
            if c.clone_id == 0 || !seen.insert(c.clone_id) {
                return inv(format!("clone id {} is zero or repeated", c.clone_id));
            }
        }
        Ok(())
    }

    /// Encodes to bytes. Validates first.
    pub fn encode(&self) -> Result<Vec<u8>, DescriptorError> {
        self.validate()?;
        let meta = serde_json::to_vec(&self.meta).map_err(DescriptorError::Meta)?;
        let holes: Vec<u8> = self
            .holes
            .as_raw_slice()
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        let total = 32 + meta.len() + self.device_state.len() + holes.len();
        if total > MAX_DESCRIPTOR {
            return Err(DescriptorError::TooLarge(total));
        }
        let header = Header {
            magic: MAGIC,
            version: VERSION,
            flags: 0,
            meta_len: meta.len() as u32,
            state_len: self.device_state.len() as u32,
            holes_len: holes.len() as u32,
            checksum: fnv1a(&[&meta, &self.device_state, &holes]),
        };
        let mut out = Vec::with_capacity(total);
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&meta);
        out.extend_from_slice(&self.device_state);
        out.extend_from_slice(&holes);
        Ok(out)
    }

    /// Decodes and validates bytes.
    pub fn decode(bytes: &[u8]) -> Result<Descriptor, DescriptorError> {
        if bytes.len() > MAX_DESCRIPTOR {
            return Err(DescriptorError::TooLarge(bytes.len()));
        }
        let (header, rest) =
            Header::read_from_prefix(bytes).map_err(|_| DescriptorError::Truncated)?;
        if header.magic != MAGIC {
            return Err(DescriptorError::BadMagic);
        }
        if header.version != VERSION && Some(header.version) != VERSION.checked_sub(1) {
            return Err(DescriptorError::Version(header.version));
        }
        let (ml, sl, hl) = (
            header.meta_len as usize,
            header.state_len as usize,
            header.holes_len as usize,
        );
        if ml.checked_add(sl).and_then(|x| x.checked_add(hl)) != Some(rest.len()) {
            return Err(DescriptorError::Truncated);
        }
        let (meta, rest) = rest.split_at(ml);
        let (state, holes) = rest.split_at(sl);
        if fnv1a(&[meta, state, holes]) != header.checksum {
            return Err(DescriptorError::Checksum);
        }
        let meta: Meta = serde_json::from_slice(meta).map_err(DescriptorError::Meta)?;
        if holes.len() % 8 != 0 {
            return Err(DescriptorError::Invalid(
                "hole map is not whole 64-bit words".into(),
            ));
        }
        let pages = meta.memory.size / PAGE_SIZE;
        if (holes.len() as u64) * 8 < pages {
            return Err(DescriptorError::Invalid(
                "hole map is shorter than guest memory".into(),
            ));
        }
        let words: Vec<u64> = holes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("chunk of 8")))
            .collect();
        let mut bits = BitVec::<u64, Lsb0>::from_vec(words);
        bits.truncate(pages as usize);
        let d = Descriptor {
            meta,
            device_state: state.to_vec(),
            holes: bits,
        };
        d.validate()?;
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Descriptor {
        let pages = (16u64 << 20) / PAGE_SIZE;
        let mut holes = bitvec![u64, Lsb0; 0; pages as usize];
        holes.set(3, true);
        holes.set(pages as usize - 1, true);
        Descriptor {
            meta: Meta {
                parent: "vm1".into(),
                origin_host: "h0".into(),
                ticket: "t-abc".into(),
                request_id: 7,
                memory: MemoryLayout {
                    size: 16 << 20,
                    generation: 1,
                    source: "h0:vm1-g1".into(),
                    data_bytes: 4096,
                },
                machine: MachineShape {
                    vcpus: 1,
                    mem_mib: 16,
                    accel: "tcg".into(),
                    image: "/img".into(),
                    cmdline: "console=ttyS0".into(),
                },
                net: FlockNet {
                    flock: 3,
                    subnet: "10.250.3.0/24".into(),
                },
                clones: vec![CloneSlot {
                    clone_id: 1,
                    vm: "vm1-t1c1".into(),
                    mac: "x".into(),
                    ip_cidr: "y".into(),
                }],
                disk: None,
                mcast_port: None,
                complete: false,
            },
            device_state: vec![1, 2, 3, 4, 5],
            holes,
        }
    }

    #[test]
    fn roundtrip() {
        let d = sample();
        let bytes = d.encode().unwrap();
        assert_eq!(Descriptor::decode(&bytes).unwrap(), d);
    }

    #[test]
    fn distribution_fields_are_optional() {
        // Left out when unset, so a descriptor without them reads as before.
        let d = sample();
        let meta = serde_json::to_string(&d.meta).unwrap();
        assert!(
            !meta.contains("mcast_port") && !meta.contains("complete"),
            "{meta}"
        );
        let mut v: serde_json::Value = serde_json::from_str(&meta).unwrap();
        let back: Meta = serde_json::from_value(v.clone()).unwrap();
        assert_eq!((back.mcast_port, back.complete), (None, false));
        v["mcast_port"] = 7404.into();
        v["complete"] = true.into();
        let back: Meta = serde_json::from_value(v).unwrap();
        assert_eq!((back.mcast_port, back.complete), (Some(7404), true));
        let mut d = sample();
        d.meta.mcast_port = Some(7404);
        d.meta.complete = true;
        let bytes = d.encode().unwrap();
        assert_eq!(Descriptor::decode(&bytes).unwrap(), d);
        for bad in [r#""mcast_port":70000"#, r#""complete":"yes""#] {
            let mut m = meta.clone();
            m.insert_str(1, &format!("{bad},"));
            assert!(serde_json::from_str::<Meta>(&m).is_err(), "{m}");
        }
    }

    #[test]
    fn the_fuzz_seeds_decode() {
        let valid =
            Descriptor::decode(include_bytes!("../../fuzz/seeds/descriptor/valid")).unwrap();
        assert_eq!((valid.meta.mcast_port, valid.meta.complete), (None, false));
        let mcast =
            Descriptor::decode(include_bytes!("../../fuzz/seeds/descriptor/mcast")).unwrap();
        assert_eq!(
            (mcast.meta.mcast_port, mcast.meta.complete),
            (Some(7404), true)
        );
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = sample().encode().unwrap();
        for n in 0..bytes.len() {
            assert!(
                Descriptor::decode(&bytes[..n]).is_err(),
                "prefix {n} decoded"
            );
        }
    }

    #[test]
    fn corruption_is_detected() {
        let mut bytes = sample().encode().unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(matches!(
            Descriptor::decode(&bytes),
            Err(DescriptorError::Checksum)
        ));
        bytes[0] = b'X';
        assert!(matches!(
            Descriptor::decode(&bytes),
            Err(DescriptorError::BadMagic)
        ));
    }

    #[test]
    fn huge_lengths_are_rejected() {
        let mut bytes = sample().encode().unwrap();
        bytes[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Descriptor::decode(&bytes),
            Err(DescriptorError::Truncated)
        ));
    }

    #[test]
    fn random_mutations_never_panic() {
        let good = sample().encode().unwrap();
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..2000 {
            let mut b = good.clone();
            for _ in 0..(next() % 8 + 1) {
                let i = (next() as usize) % b.len();
                b[i] = next() as u8;
            }
            let _ = Descriptor::decode(&b);
            let len = (next() as usize) % 256;
            let junk: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            assert!(Descriptor::decode(&junk).is_err());
        }
    }

    #[test]
    fn inconsistent_meta_is_invalid() {
        let mut d = sample();
        d.meta.clones.push(d.meta.clones[0].clone());
        assert!(matches!(d.encode(), Err(DescriptorError::Invalid(_))));
        let mut d = sample();
        d.meta.memory.size += 1;
        assert!(d.encode().is_err());
    }

    #[test]
    fn disk_layouts_round_trip_and_bad_ones_are_refused() {
        let mut d = sample();
        let layer = |format: &str, data: Vec<(u64, u64)>| DiskLayer {
            source: "h0:vm1-d0".into(),
            format: format.into(),
            size: 1 << 20,
            data,
        };
        d.meta.disk = Some(DiskLayout {
            virtual_size: 1 << 30,
            layers: vec![
                layer("raw", vec![(0, 8192), (65536, 1 << 20)]),
                layer("qcow2", vec![]),
            ],
        });
        let back = Descriptor::decode(&d.encode().unwrap()).unwrap();
        assert_eq!(back, d);
        let bad = [
            vec![],
            vec![layer("vmdk", vec![])],
            vec![layer("raw", vec![]), layer("raw", vec![])],
            vec![layer("raw", vec![(0, 100)])],
            vec![layer("raw", vec![(8192, 4096)])],
            vec![layer("raw", vec![(0, 8192), (4096, 12288)])],
            vec![layer("raw", vec![(0, 2 << 20)])],
        ];
        for layers in bad {
            let mut d = sample();
            d.meta.disk = Some(DiskLayout {
                virtual_size: 1 << 30,
                layers: layers.clone(),
            });
            assert!(
                matches!(d.encode(), Err(DescriptorError::Invalid(_))),
                "{layers:?}"
            );
        }
    }
}
