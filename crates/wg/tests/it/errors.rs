//! Errors name the operation and its object; the kernel backend says it is unavailable.

use crate::{device_config, require_root, runtime_in, testbed, IFACE};
use nicwarden_wg::{kernel_backend_status, GotatunBackend, StaticKey, WgError};
use std::net::SocketAddr;

#[test]
fn kernel_backend_is_unavailable_and_points_to_gotatun() {
    // Probe inside a testbed namespace when privileged, so a probe link (if the module
    // existed) never touches the host's namespace.
    let status = if nicwarden_testbed::has_privileges() {
        let tb = testbed(1);
        tb.nodes()[0].netns.run(kernel_backend_status).unwrap()
    } else {
        kernel_backend_status()
    };
    let Err(WgError::Unavailable(msg)) = status else {
        panic!("expected Unavailable, got {status:?}");
    };
    assert!(msg.contains("use backend \"gotatun\""), "{msg}");
    if !std::path::Path::new("/sys/module/wireguard").exists() {
        assert!(
            msg.starts_with("kernel WireGuard is not available on this kernel"),
            "{msg}"
        );
    }
}

#[test]
fn start_errors_name_the_operation() {
    require_root!();
    let tb = testbed(1);
    let node = &tb.nodes()[0];
    let rt = runtime_in(&node.netns);
    let key = StaticKey::generate();
    let start = |cfg: nicwarden_wg::DeviceConfig| {
        node.netns
            .run(|| rt.block_on(GotatunBackend::start(&cfg, &key)))
            .unwrap()
    };

    // An address the node does not have.
    let mut cfg = device_config(node);
    cfg.listen = SocketAddr::from(([198, 18, 0, 200], 51820));
    let err = start(cfg).unwrap_err().to_string();
    assert!(err.starts_with("bind UDP 198.18.0.200:51820: "), "{err}");
    // Nothing was left behind.
    assert!(node.netns.ip(&["link", "show", "dev", IFACE]).is_err());

    // A TUN name already taken.
    let first = start(device_config(node)).unwrap();
    let mut cfg = device_config(node);
    cfg.listen.set_port(51821);
    let err = start(cfg).unwrap_err().to_string();
    assert!(err.starts_with(&format!("create TUN {IFACE} ")), "{err}");
    // The same port twice.
    let mut cfg = device_config(node);
    cfg.iface = "nwmesh1".to_string();
    let err = start(cfg).unwrap_err().to_string();
    assert!(err.starts_with("bind UDP 198.18.0.1:51820: "), "{err}");
    // Invalid config is refused before anything is created.
    let mut cfg = device_config(node);
    cfg.iface = "much-too-long-name".to_string();
    let err = start(cfg).unwrap_err().to_string();
    assert!(
        err.starts_with("invalid WireGuard device config: iface"),
        "{err}"
    );

    rt.block_on(nicwarden_wg::WgBackend::shutdown(&first))
        .unwrap();
    tb.teardown().unwrap();
}
