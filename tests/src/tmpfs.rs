//! A small tmpfs mounted for one test, to run pgpitr out of disk space (ENOSPC) for real:
//! `mount -t tmpfs -o size=…`, which needs root (CI runs as root). Unmounted on drop, lazily
//! (`umount -l`) when a process still holds a file in it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{is_root, run_ok, temp_dir};

pub struct Tmpfs {
    dir: PathBuf,
    /// Owns the mount point (removed after the unmount, fields drop after `drop`).
    _root: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it: `2m`, `1536k`) with mode 0777, so
    /// that PostgreSQL's user can write into it too.
    ///
    /// # Panics
    /// When not root: a tmpfs needs root to mount (CI runs the tests as root).
    pub fn mount(tag: &str, size: &str) -> Tmpfs {
        assert!(
            is_root(),
            "this test mounts a tmpfs to fill a disk for real, which needs root (CI runs as root); run it as root"
        );
        let root = temp_dir(tag);
        let dir = root.path().join("mnt");
        std::fs::create_dir(&dir).unwrap();
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={size},mode=0777"))
                .arg("tmpfs")
                .arg(&dir),
        );
        Tmpfs { dir, _root: root }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Grows (or shrinks) the file system in place: `mount -o remount,size=…`.
    pub fn resize(&self, size: &str) {
        run_ok(
            Command::new("mount")
                .args(["-o"])
                .arg(format!("remount,size={size}"))
                .arg(&self.dir),
        );
    }

    /// Fills the file system with `name` until a write fails with ENOSPC; returns the file's path
    /// (remove it to free the space again). Free space is zero afterwards.
    pub fn fill(&self, name: &str) -> PathBuf {
        let path = self.dir.join(name);
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0x5au8; 4096];
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        assert_eq!(self.free_bytes(), 0, "{} is not full", self.dir.display());
        path
    }

    /// Bytes still free for an unprivileged writer (`statvfs` f_bavail × f_frsize).
    pub fn free_bytes(&self) -> u64 {
        let c = std::ffi::CString::new(self.dir.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a NUL-terminated path and `st` is writable for the call.
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
        st.f_bavail as u64 * st.f_frsize as u64
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // A process (a server killed late, a detached refill) still holds a file in it.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}
