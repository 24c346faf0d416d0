"""GuestAgentService's workspace files: WriteFile, ReadFile, ListFiles, RemoveFile.

A mixin of :class:`agentvm_guest.agent.GuestAgent`. Every path is resolved
under the workspace without following symbolic links (paths.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import grpc

from agentvm.v1 import guest_agent_pb2
from agentvm_guest import paths


class WorkspaceFiles:
    """Files under /workspace."""

    workspace: str

    def WriteFile(
        self,
        request_iterator: Iterator[guest_agent_pb2.GuestAgentServiceWriteFileRequest],
        context: grpc.ServicerContext,
    ) -> guest_agent_pb2.GuestAgentServiceWriteFileResponse:
        writer: paths.AtomicWriter | None = None
        expected = ""
        try:
            for msg in request_iterator:
                if writer is None:
                    writer = paths.AtomicWriter(self.workspace, msg.path, msg.mode or 0o644)
                if msg.chunk:
                    writer.write(msg.chunk)
                if msg.sha256:
                    expected = msg.sha256
            if writer is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "WriteFile got no message")
            writer.commit(expected)
            return guest_agent_pb2.GuestAgentServiceWriteFileResponse(
                size_bytes=writer.size, sha256=writer.sha256
            )
        except paths.PathError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except FileNotFoundError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except OSError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"cannot write: {exc}")
        finally:
            if writer is not None:
                writer.abort()  # no-op once committed

    def ReadFile(
        self,
        request: guest_agent_pb2.GuestAgentServiceReadFileRequest,
        context: grpc.ServicerContext,
    ) -> Iterator[guest_agent_pb2.GuestAgentServiceReadFileResponse]:
        h = hashlib.sha256()
        first = True
        try:
            for data, size in paths.read_chunks(
                self.workspace,
                request.path,
                max_bytes=request.max_bytes,
                refuse_sparse=request.refuse_sparse,
            ):
                h.update(data)
                msg = guest_agent_pb2.GuestAgentServiceReadFileResponse(chunk=data)
                if first:
                    msg.size_bytes = size
                    first = False
                yield msg
        except paths.SparseError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except paths.LimitError as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except paths.PathError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except FileNotFoundError:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no file {request.path!r} in the workspace")
        yield guest_agent_pb2.GuestAgentServiceReadFileResponse(sha256=h.hexdigest())

    def ListFiles(
        self,
        request: guest_agent_pb2.GuestAgentServiceListFilesRequest,
        context: grpc.ServicerContext,
    ) -> guest_agent_pb2.GuestAgentServiceListFilesResponse:
        try:
            entries = paths.list_dir(
                self.workspace,
                request.path,
                recursive=request.recursive,
                limit=min(request.max_entries or paths.MAX_LIST_ENTRIES, paths.MAX_LIST_ENTRIES),
                max_bytes=min(request.max_bytes or paths.MAX_LIST_BYTES, paths.MAX_LIST_BYTES),
            )
        except paths.LimitError as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except paths.PathError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except FileNotFoundError:
            context.abort(
                grpc.StatusCode.NOT_FOUND, f"no directory {request.path!r} in the workspace"
            )
        resp = guest_agent_pb2.GuestAgentServiceListFilesResponse()
        for e in entries:
            info = resp.files.add(path=e.path, size_bytes=e.size, mode=e.mode, is_dir=e.is_dir)
            info.modified_at.FromNanoseconds(int(e.mtime * 1e9))
        return resp

    def RemoveFile(
        self,
        request: guest_agent_pb2.GuestAgentServiceRemoveFileRequest,
        context: grpc.ServicerContext,
    ) -> guest_agent_pb2.GuestAgentServiceRemoveFileResponse:
        try:
            paths.remove(self.workspace, request.path, recursive=request.recursive)
        except paths.PathError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except FileNotFoundError:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no file {request.path!r} in the workspace")
        return guest_agent_pb2.GuestAgentServiceRemoveFileResponse()
