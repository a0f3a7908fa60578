// A small layer over the generated stubs: a Connect gRPC client of EngineService configured
// from the environment, and readable errors that carry the engine's ErrorInfo reason.
import { readFileSync } from "node:fs";

import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";
import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import { EngineService } from "./gen/machina/engine/v1/engine_service_pb.js";

export type EngineClient = Client<typeof EngineService>;

/** Where and how to reach the engine. */
export interface Settings {
  /** `host:port` (plaintext unless `tls`), or a URL `http://host:port` / `https://host:port`. */
  target: string;
  /** Sent as `authorization: Bearer <key>`; empty = no key (an engine without API keys). */
  apiKey: string;
  /** Use TLS. The server certificate is checked against Node's trust store, which
   * NODE_EXTRA_CA_CERTS extends, or against `caFile` alone when it is set. */
  tls: boolean;
  /** PEM file of the CA(s) to trust instead of the system ones (implies `tls`). */
  caFile: string;
}

/**
 * Settings from the environment: MACHINA_TARGET (default 127.0.0.1:50051), MACHINA_API_KEY,
 * MACHINA_TLS (`1`/`true`) and MACHINA_CA_FILE.
 */
export function settingsFromEnv(env: NodeJS.ProcessEnv = process.env): Settings {
  const caFile = env.MACHINA_CA_FILE ?? "";
  return {
    target: env.MACHINA_TARGET || "127.0.0.1:50051",
    apiKey: env.MACHINA_API_KEY ?? "",
    tls:
      caFile !== "" ||
      (env.MACHINA_TARGET ?? "").startsWith("https://") ||
      ["1", "true", "yes"].includes((env.MACHINA_TLS ?? "").toLowerCase()),
    caFile,
  };
}

/** A client of EngineService over gRPC (HTTP/2), the protocol the engine serves. */
export function connectEngine(settings: Settings): EngineClient {
  const hasScheme = /^https?:\/\//.test(settings.target);
  const tls = settings.tls || settings.target.startsWith("https://");
  // A bare host:port gets the scheme TLS asks for; an explicit http:// is upgraded when TLS is on.
  const baseUrl = hasScheme
    ? settings.target.replace(/^http:/, tls ? "https:" : "http:")
    : `${tls ? "https" : "http"}://${settings.target}`;
  const interceptors: Interceptor[] = [];
  if (settings.apiKey) {
    const bearer = `Bearer ${settings.apiKey}`;
    interceptors.push((next) => (request) => {
      request.header.set("authorization", bearer);
      return next(request);
    });
  }
  const transport = createGrpcTransport({
    baseUrl,
    interceptors,
    nodeOptions: settings.caFile ? { ca: readFileSync(settings.caFile) } : {},
  });
  return createClient(EngineService, transport);
}

/** google.rpc.ErrorInfo: the stable `reason` clients branch on, and every dynamic value. */
export interface ErrorInfo {
  reason: string;
  domain: string;
  metadata: Record<string, string>;
}

/** An RPC failure in the terms of the API reference (docs/api.md). */
export interface RpcFailure {
  /** The canonical gRPC status name, e.g. `NOT_FOUND`. */
  code: string;
  message: string;
  /** The engine's ErrorInfo, when the failure came from the engine (not the network or TLS). */
  info?: ErrorInfo;
}

// Indexed by Connect's Code, which uses the gRPC status numbers.
const GRPC_CODES = [
  "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
  "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
  "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
];

/** Turns anything a call threw into an RpcFailure. */
export function rpcFailure(error: unknown): RpcFailure {
  const err = ConnectError.from(error);
  const failure: RpcFailure = { code: GRPC_CODES[err.code] ?? Code[err.code], message: err.rawMessage };
  for (const detail of err.details) {
    // Connect decodes grpc-status-details-bin into (type name, bytes) pairs.
    if ("type" in detail && detail.type === "google.rpc.ErrorInfo") {
      failure.info = decodeErrorInfo(detail.value);
    }
  }
  return failure;
}

/** One line for people: `NOT_FOUND ERR_RUN_NOT_FOUND: no run 'x' {run_id=x}`. */
export function describeFailure(failure: RpcFailure): string {
  const reason = failure.info ? ` ${failure.info.reason}` : "";
  const meta = Object.entries(failure.info?.metadata ?? {}).map(([k, v]) => `${k}=${v}`);
  return `${failure.code}${reason}: ${failure.message}${meta.length ? ` {${meta.join(", ")}}` : ""}`;
}

// proto/ does not include googleapis, and its generated TypeScript is not an npm-registry
// package, so the three fields of google.rpc.ErrorInfo are read straight off the wire:
// reason = 1, domain = 2, map<string, string> metadata = 3.
function decodeErrorInfo(bytes: Uint8Array): ErrorInfo {
  const info: ErrorInfo = { reason: "", domain: "", metadata: {} };
  const reader = new BinaryReader(bytes);
  while (reader.pos < reader.len) {
    const [field, wireType] = reader.tag();
    if (field === 1 && wireType === WireType.LengthDelimited) info.reason = reader.string();
    else if (field === 2 && wireType === WireType.LengthDelimited) info.domain = reader.string();
    else if (field === 3 && wireType === WireType.LengthDelimited) {
      const entry = new BinaryReader(reader.bytes());
      let key = "";
      let value = "";
      while (entry.pos < entry.len) {
        const [entryField, entryWire] = entry.tag();
        if (entryField === 1 && entryWire === WireType.LengthDelimited) key = entry.string();
        else if (entryField === 2 && entryWire === WireType.LengthDelimited) value = entry.string();
        else entry.skip(entryWire);
      }
      info.metadata[key] = value;
    } else reader.skip(wireType);
  }
  return info;
}
