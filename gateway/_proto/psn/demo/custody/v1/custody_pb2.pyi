from google.protobuf import any_pb2 as _any_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetRecordRequest(_message.Message):
    __slots__ = ("custody_number",)
    CUSTODY_NUMBER_FIELD_NUMBER: _ClassVar[int]
    custody_number: str
    def __init__(self, custody_number: _Optional[str] = ...) -> None: ...

class CustodyRecord(_message.Message):
    __slots__ = ("custody_number", "detainee", "station", "offence", "status")
    CUSTODY_NUMBER_FIELD_NUMBER: _ClassVar[int]
    DETAINEE_FIELD_NUMBER: _ClassVar[int]
    STATION_FIELD_NUMBER: _ClassVar[int]
    OFFENCE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    custody_number: str
    detainee: str
    station: str
    offence: str
    status: str
    def __init__(self, custody_number: _Optional[str] = ..., detainee: _Optional[str] = ..., station: _Optional[str] = ..., offence: _Optional[str] = ..., status: _Optional[str] = ...) -> None: ...

class BulkLookupSummary(_message.Message):
    __slots__ = ("found", "not_found")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_FIELD_NUMBER: _ClassVar[int]
    found: _containers.RepeatedCompositeFieldContainer[CustodyRecord]
    not_found: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, found: _Optional[_Iterable[_Union[CustodyRecord, _Mapping]]] = ..., not_found: _Optional[_Iterable[str]] = ...) -> None: ...

class ErrorStatus(_message.Message):
    __slots__ = ("code", "message", "details")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    details: _containers.RepeatedCompositeFieldContainer[_any_pb2.Any]
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., details: _Optional[_Iterable[_Union[_any_pb2.Any, _Mapping]]] = ...) -> None: ...

class NotFoundDetail(_message.Message):
    __slots__ = ("custody_number", "hint")
    CUSTODY_NUMBER_FIELD_NUMBER: _ClassVar[int]
    HINT_FIELD_NUMBER: _ClassVar[int]
    custody_number: str
    hint: str
    def __init__(self, custody_number: _Optional[str] = ..., hint: _Optional[str] = ...) -> None: ...
