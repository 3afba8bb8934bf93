//! Tells which OS and architecture an ELF executable or shared library was built for, from its header alone.

/// Bytes of a file needed to recognise its ELF target.
pub const ELF_SNIFF_BYTES: usize = 20;

/// `(os, arch)` of an ELF executable or shared object, in `std::env::consts::{OS, ARCH}` names; `None` for
/// anything else (scripts, data, object files).
///
/// The OS comes from `EI_OSABI`: Linux toolchains write `ELFOSABI_NONE` (System V) almost always, so that is
/// read as `linux`; the BSDs write their own value.
pub fn detect_elf_target(bytes: &[u8]) -> Option<(&'static str, &'static str)> {
    if bytes.len() < ELF_SNIFF_BYTES || bytes[..4] != *b"\x7fELF" {
        return None;
    }
    let class64 = match bytes[4] {
        1 => false,
        2 => true,
        _ => return None,
    };
    let little_endian = match bytes[5] {
        1 => true,
        2 => false,
        _ => return None,
    };
    let read_u16 = |at: usize| {
        let pair = [bytes[at], bytes[at + 1]];
        if little_endian {
            u16::from_le_bytes(pair)
        } else {
            u16::from_be_bytes(pair)
        }
    };
    const ET_EXEC: u16 = 2;
    const ET_DYN: u16 = 3;
    if !matches!(read_u16(16), ET_EXEC | ET_DYN) {
        return None;
    }
    let os = match bytes[7] {
        0 | 3 => "linux",
        2 => "netbsd",
        6 => "solaris",
        9 => "freebsd",
        12 => "openbsd",
        _ => return None,
    };
    let arch = match (read_u16(18), class64, little_endian) {
        (3, false, _) => "x86",
        (62, true, _) => "x86_64",
        (40, false, _) => "arm",
        (183, true, _) => "aarch64",
        (243, true, _) => "riscv64",
        (243, false, _) => "riscv32",
        (21, true, true) => "powerpc64le",
        (21, true, false) => "powerpc64",
        (20, false, _) => "powerpc",
        (22, true, _) => "s390x",
        (258, true, _) => "loongarch64",
        (8, false, _) => "mips",
        (8, true, _) => "mips64",
        (2 | 43, true, _) => "sparc64",
        _ => return None,
    };
    Some((os, arch))
}

/// `os/arch` as printed in messages.
pub(crate) fn target_label(os: &str, arch: &str) -> String {
    format!("{os}/{arch}")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ELF header (64 bytes) for tests: class 64, little endian, the given OS ABI, type and machine.
    pub(crate) fn elf_header(osabi: u8, e_type: u16, machine: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[6] = 1;
        h[7] = osabi;
        h[16..18].copy_from_slice(&e_type.to_le_bytes());
        h[18..20].copy_from_slice(&machine.to_le_bytes());
        h
    }

    #[test]
    fn recognises_common_targets() {
        assert_eq!(
            detect_elf_target(&elf_header(0, 2, 62)),
            Some(("linux", "x86_64"))
        );
        assert_eq!(
            detect_elf_target(&elf_header(3, 3, 183)),
            Some(("linux", "aarch64"))
        );
        assert_eq!(
            detect_elf_target(&elf_header(9, 2, 62)),
            Some(("freebsd", "x86_64"))
        );
        // Relocatable objects, non-ELF data and short files are not binaries we can judge.
        assert_eq!(detect_elf_target(&elf_header(0, 1, 62)), None);
        assert_eq!(detect_elf_target(b"#!/bin/sh\necho hello world\n"), None);
        assert_eq!(detect_elf_target(b"\x7fELF"), None);
    }

    #[test]
    fn recognises_the_running_test_binary() {
        let exe = std::env::current_exe().unwrap();
        let bytes = std::fs::read(exe).unwrap();
        assert_eq!(
            detect_elf_target(&bytes),
            Some((std::env::consts::OS, std::env::consts::ARCH))
        );
    }
}
