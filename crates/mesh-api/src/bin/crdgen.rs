//! Writes the CustomResourceDefinitions generated from the Rust types to a directory
//! (`make crds`), or checks that the directory matches them (`make check-crds`).

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: crdgen [--check] DIR

Writes crds/meshnodes.yaml and crds/meshservices.yaml from the mesh-api types.
  --check   write nothing; exit 1 and name each file that differs (run `make crds` to fix)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (check, dir) = match args.as_slice() {
        [flag, dir] if flag == "--check" => (true, PathBuf::from(dir)),
        [dir] if !dir.starts_with('-') => (false, PathBuf::from(dir)),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(check, &dir) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("crdgen: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Returns whether the directory is (check) or now is (write) up to date.
fn run(check: bool, dir: &std::path::Path) -> anyhow::Result<bool> {
    let mut up_to_date = true;
    for (file, yaml) in mesh_api::render_crd_files()? {
        let path = dir.join(file);
        let current = std::fs::read_to_string(&path).ok();
        if current.as_deref() == Some(yaml.as_str()) {
            continue;
        }
        if check {
            eprintln!("crdgen: {} differs from the mesh-api types; run `make crds` and commit it", path.display());
            up_to_date = false;
        } else {
            std::fs::create_dir_all(dir)?;
            std::fs::write(&path, yaml).map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    Ok(up_to_date)
}
