"""s3fs under the project's retry policy (rca_core.object_io): the file system class behind every s3:// location of
this process (rca_core.storage registers it with fsspec, so zarr-python's and pyarrow's S3 requests use it too).

Every request s3fs makes passes `_call_s3` (listing pages included; its file objects' uploads through its sync twin
`call_s3`, rebuilt here on the retrying one); a whole-object read (`_cat_file`) and a
file's ranged read (`S3File._fetch_range`, what `open()` readers such as pyarrow's Parquet reader use), whose
bodies can be cut off after the headers, are each retried as one request. s3fs's own retry loop is reduced to one try
(`retries = 1`) and botocore's to one attempt (rca_core.storage.options_for), so the policy's attempts, backoff,
deadline and counters are the only ones.
"""
from __future__ import annotations

import contextvars

import s3fs
from fsspec.asyn import sync_wrapper

from rca_core import object_io

_INSIDE = contextvars.ContextVar("rca_s3_request", default=False)  # an enclosing request retries as a whole


class RetryingS3FileSystem(s3fs.S3FileSystem):
    retries = 1  # s3fs's own loop: one try (the project's policy retries)

    async def _retrying(self, what: str, make):
        if _INSIDE.get():
            return await make()
        token = _INSIDE.set(True)
        try:
            return await object_io.with_retries_async(what, make)
        finally:
            _INSIDE.reset(token)

    async def _call_s3(self, method, *akwarglist, **kwargs):
        what = f"{method} {kwargs.get('Bucket', '')}/{kwargs.get('Key', kwargs.get('Prefix', ''))}"
        return await self._retrying(what, lambda: super(RetryingS3FileSystem, self)._call_s3(method, *akwarglist,
                                                                                               **kwargs))

    # s3fs's own sync twin, made from the base class's coroutine when s3fs was defined: what its file objects
    # call (an upload's put_object, a multipart upload's parts) and what would bypass the policy without this
    call_s3 = sync_wrapper(_call_s3)

    async def _cat_file(self, path, *args, **kwargs):
        return await self._retrying(f"GET {path}", lambda: super(RetryingS3FileSystem, self)._cat_file(path, *args,
                                                                                                      **kwargs))

    def _open(self, *args, **kwargs):
        f = super()._open(*args, **kwargs)
        f.__class__ = RetryingS3File  # s3fs builds its S3File; its ranged reads get the policy
        if getattr(getattr(f, "cache", None), "fetcher", None) is not None:
            f.cache.fetcher = f._fetch_range  # the read cache took the method when the file was made
        return f


class RetryingS3File(s3fs.core.S3File):
    def _fetch_range(self, start, end):
        if _INSIDE.get():
            return super()._fetch_range(start, end)
        token = _INSIDE.set(True)  # the request's own S3 call (on s3fs's loop) passes straight through
        try:
            return object_io.with_retries(f"GET {self.path} [{start}:{end}]",
                                          lambda: super(RetryingS3File, self)._fetch_range(start, end))
        finally:
            _INSIDE.reset(token)
