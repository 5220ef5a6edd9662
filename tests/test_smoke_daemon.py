from tests.support.daemon import Daemon


def test_daemon_starts_serves_status_and_stops_cleanly(daemon: Daemon) -> None:
    with daemon.client() as api:
        st = api.status()
        assert [lun.name for lun in api.list_luns()] == ["demo"]
    assert st.nbd.unix == daemon.socket
    assert daemon.stop() == 0
    assert not (daemon.home / "daemon.json").exists()
