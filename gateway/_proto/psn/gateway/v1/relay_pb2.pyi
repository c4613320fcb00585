from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CallType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CALL_TYPE_UNSPECIFIED: _ClassVar[CallType]
    UNARY: _ClassVar[CallType]
    SERVER_STREAM: _ClassVar[CallType]
    CLIENT_STREAM: _ClassVar[CallType]
    BIDI_STREAM: _ClassVar[CallType]
CALL_TYPE_UNSPECIFIED: CallType
UNARY: CallType
SERVER_STREAM: CallType
CLIENT_STREAM: CallType
BIDI_STREAM: CallType

class Principal(_message.Message):
    __slots__ = ("officer_id", "force", "units", "roles", "clearance")
    OFFICER_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    CLEARANCE_FIELD_NUMBER: _ClassVar[int]
    officer_id: str
    force: str
    units: _containers.RepeatedScalarFieldContainer[str]
    roles: _containers.RepeatedScalarFieldContainer[str]
    clearance: str
    def __init__(self, officer_id: _Optional[str] = ..., force: _Optional[str] = ..., units: _Optional[_Iterable[str]] = ..., roles: _Optional[_Iterable[str]] = ..., clearance: _Optional[str] = ...) -> None: ...

class Purpose(_message.Message):
    __slots__ = ("justification", "case_reference", "text")
    JUSTIFICATION_FIELD_NUMBER: _ClassVar[int]
    CASE_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    justification: str
    case_reference: str
    text: str
    def __init__(self, justification: _Optional[str] = ..., case_reference: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class MetadataEntry(_message.Message):
    __slots__ = ("key", "value")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: bytes
    def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...

class EnvelopeBody(_message.Message):
    __slots__ = ("version", "request_id", "origin_force", "origin_gateway", "host_force", "application", "method", "call_type", "principal", "purpose", "issued_at_ms", "deadline_ms", "messages_digest", "message_count", "metadata", "origin_decision_id", "origin_policy_version")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FORCE_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_GATEWAY_FIELD_NUMBER: _ClassVar[int]
    HOST_FORCE_FIELD_NUMBER: _ClassVar[int]
    APPLICATION_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CALL_TYPE_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_DIGEST_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    request_id: str
    origin_force: str
    origin_gateway: str
    host_force: str
    application: str
    method: str
    call_type: CallType
    principal: Principal
    purpose: Purpose
    issued_at_ms: int
    deadline_ms: int
    messages_digest: bytes
    message_count: int
    metadata: _containers.RepeatedCompositeFieldContainer[MetadataEntry]
    origin_decision_id: str
    origin_policy_version: str
    def __init__(self, version: _Optional[int] = ..., request_id: _Optional[str] = ..., origin_force: _Optional[str] = ..., origin_gateway: _Optional[str] = ..., host_force: _Optional[str] = ..., application: _Optional[str] = ..., method: _Optional[str] = ..., call_type: _Optional[_Union[CallType, str]] = ..., principal: _Optional[_Union[Principal, _Mapping]] = ..., purpose: _Optional[_Union[Purpose, _Mapping]] = ..., issued_at_ms: _Optional[int] = ..., deadline_ms: _Optional[int] = ..., messages_digest: _Optional[bytes] = ..., message_count: _Optional[int] = ..., metadata: _Optional[_Iterable[_Union[MetadataEntry, _Mapping]]] = ..., origin_decision_id: _Optional[str] = ..., origin_policy_version: _Optional[str] = ...) -> None: ...

class RequestSealBody(_message.Message):
    __slots__ = ("version", "request_id", "envelope_digest", "messages_digest", "message_count", "issued_at_ms")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_DIGEST_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    version: int
    request_id: str
    envelope_digest: bytes
    messages_digest: bytes
    message_count: int
    issued_at_ms: int
    def __init__(self, version: _Optional[int] = ..., request_id: _Optional[str] = ..., envelope_digest: _Optional[bytes] = ..., messages_digest: _Optional[bytes] = ..., message_count: _Optional[int] = ..., issued_at_ms: _Optional[int] = ...) -> None: ...

class ResponseSealBody(_message.Message):
    __slots__ = ("version", "request_id", "envelope_digest", "host_force", "host_gateway", "status_code", "status_message", "initial_metadata", "trailing_metadata", "messages_digest", "message_count", "issued_at_ms", "decision_id", "policy_version")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    HOST_FORCE_FIELD_NUMBER: _ClassVar[int]
    HOST_GATEWAY_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    STATUS_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    INITIAL_METADATA_FIELD_NUMBER: _ClassVar[int]
    TRAILING_METADATA_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_DIGEST_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    request_id: str
    envelope_digest: bytes
    host_force: str
    host_gateway: str
    status_code: int
    status_message: str
    initial_metadata: _containers.RepeatedCompositeFieldContainer[MetadataEntry]
    trailing_metadata: _containers.RepeatedCompositeFieldContainer[MetadataEntry]
    messages_digest: bytes
    message_count: int
    issued_at_ms: int
    decision_id: str
    policy_version: str
    def __init__(self, version: _Optional[int] = ..., request_id: _Optional[str] = ..., envelope_digest: _Optional[bytes] = ..., host_force: _Optional[str] = ..., host_gateway: _Optional[str] = ..., status_code: _Optional[int] = ..., status_message: _Optional[str] = ..., initial_metadata: _Optional[_Iterable[_Union[MetadataEntry, _Mapping]]] = ..., trailing_metadata: _Optional[_Iterable[_Union[MetadataEntry, _Mapping]]] = ..., messages_digest: _Optional[bytes] = ..., message_count: _Optional[int] = ..., issued_at_ms: _Optional[int] = ..., decision_id: _Optional[str] = ..., policy_version: _Optional[str] = ...) -> None: ...

class Signed(_message.Message):
    __slots__ = ("body", "signer_certificate", "signature")
    BODY_FIELD_NUMBER: _ClassVar[int]
    SIGNER_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    body: bytes
    signer_certificate: bytes
    signature: bytes
    def __init__(self, body: _Optional[bytes] = ..., signer_certificate: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class UnaryRelayRequest(_message.Message):
    __slots__ = ("envelope", "message")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    envelope: Signed
    message: bytes
    def __init__(self, envelope: _Optional[_Union[Signed, _Mapping]] = ..., message: _Optional[bytes] = ...) -> None: ...

class UnaryRelayResponse(_message.Message):
    __slots__ = ("message", "seal")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SEAL_FIELD_NUMBER: _ClassVar[int]
    message: bytes
    seal: Signed
    def __init__(self, message: _Optional[bytes] = ..., seal: _Optional[_Union[Signed, _Mapping]] = ...) -> None: ...

class StreamMessage(_message.Message):
    __slots__ = ("seq", "data")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    seq: int
    data: bytes
    def __init__(self, seq: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class Headers(_message.Message):
    __slots__ = ("metadata",)
    METADATA_FIELD_NUMBER: _ClassVar[int]
    metadata: _containers.RepeatedCompositeFieldContainer[MetadataEntry]
    def __init__(self, metadata: _Optional[_Iterable[_Union[MetadataEntry, _Mapping]]] = ...) -> None: ...

class RelayFrame(_message.Message):
    __slots__ = ("envelope", "message", "request_seal", "headers", "response_seal")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_SEAL_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_SEAL_FIELD_NUMBER: _ClassVar[int]
    envelope: Signed
    message: StreamMessage
    request_seal: Signed
    headers: Headers
    response_seal: Signed
    def __init__(self, envelope: _Optional[_Union[Signed, _Mapping]] = ..., message: _Optional[_Union[StreamMessage, _Mapping]] = ..., request_seal: _Optional[_Union[Signed, _Mapping]] = ..., headers: _Optional[_Union[Headers, _Mapping]] = ..., response_seal: _Optional[_Union[Signed, _Mapping]] = ...) -> None: ...
