"""A small client of the admin API, for the CLI and for scripts."""

from __future__ import annotations

from typing import Any, Optional

import httpx


class AdminError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        message = body.get("error") or body.get("detail") if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {message}")


class AdminClient:
    def __init__(self, url: str, api_key: Optional[str], timeout: float = 60.0, cacert: Optional[str] = None) -> None:
        """``cacert``: the CA (or self-signed certificate) that signed the controller's HTTPS certificate."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout,
                                  verify=cacert if cacert else True)

    def _do(self, method: str, path: str, **kw) -> Any:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise AdminError(0, {"error": f"cannot reach the controller at {self._http.base_url}: {exc}"}) from None
        try:
            body = r.json()
        except ValueError:
            body = {"error": r.text}
        if r.status_code >= 400:
            raise AdminError(r.status_code, body)
        return body

    def status(self) -> dict:
        return self._do("GET", "/hicache/storage-backend")

    def switch(self, backend: Optional[str] = None, spec: Optional[dict] = None, *, force: bool = False,
               drain_timeout_s: float = 5.0) -> dict:
        body: dict = {"force": force, "drain_timeout_s": drain_timeout_s}
        body.update({"spec": spec} if spec is not None else {"backend": backend})
        return self._do("PUT", "/hicache/storage-backend", json=body)

    def remove(self, name: str) -> dict:
        return self._do("DELETE", f"/hicache/storage-backend/members/{name}")

    def detach(self, *, force: bool = False, drain_timeout_s: float = 5.0) -> dict:
        return self._do("DELETE", "/hicache/storage-backend",
                        params={"force": str(force).lower(), "drain_timeout_s": drain_timeout_s})

    def events(self, limit: int = 100) -> list:
        return self._do("GET", "/hicache/storage-backend/events", params={"limit": limit})
