"""Free ports: chosen one call at a time, none is handed out twice while its server may still
be on the way (CI: a test's six ports, chosen one by one, held the same port twice)."""

from __future__ import annotations

from latitude.lab import ports


def test_ports_chosen_one_at_a_time_are_all_different(monkeypatch):
    # A small range makes a repeat certain without the memory: 40 draws from 50 ports.
    monkeypatch.delenv("LATITUDE_PORTS", raising=False)  # a test worker's own slice
    monkeypatch.setattr(ports, "SERVICE_PORTS", range(30000, 30050))
    monkeypatch.setattr(ports, "_handed_out", ports.deque(maxlen=ports._RECENT))
    chosen = [ports.free_port() for _ in range(40)]
    assert len(set(chosen)) == 40
    assert all(p in range(30000, 30050) for p in chosen)


def test_a_range_handed_out_entirely_is_an_error_that_says_so(monkeypatch):
    monkeypatch.delenv("LATITUDE_PORTS", raising=False)
    monkeypatch.setattr(ports, "SERVICE_PORTS", range(30100, 30104))
    monkeypatch.setattr(ports, "_handed_out", ports.deque(maxlen=ports._RECENT))
    ports.free_ports(4)
    try:
        ports.free_port()
    except ports.LabError as exc:
        assert "no 1 free ports between 30100 and 30104" in str(exc)
    else:
        raise AssertionError("a fifth port came out of a range of four")


def test_a_lab_beside_another_takes_the_range_it_is_given():
    assert ports.service_ports({"LATITUDE_PORTS": "26000-31999"}) == range(26000, 32000)
    assert ports.service_ports({}) == ports.SERVICE_PORTS
    for bad in ("26000", "a-b", "31999-26000", "80-90", "60000-70000"):
        try:
            ports.service_ports({"LATITUDE_PORTS": bad})
        except ports.LabError as exc:
            assert "LATITUDE_PORTS" in str(exc) and bad in str(exc)
        else:
            raise AssertionError(f"{bad!r} was taken")
