from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class FetchDocumentRequest(_message.Message):
    __slots__ = ("case_reference", "document_id", "chunk_size")
    CASE_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    case_reference: str
    document_id: str
    chunk_size: int
    def __init__(self, case_reference: _Optional[str] = ..., document_id: _Optional[str] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class DocumentChunk(_message.Message):
    __slots__ = ("offset", "data", "last")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    last: bool
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ...) -> None: ...

class ReviewComment(_message.Message):
    __slots__ = ("case_reference", "paragraph", "comment")
    CASE_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    PARAGRAPH_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    case_reference: str
    paragraph: str
    comment: str
    def __init__(self, case_reference: _Optional[str] = ..., paragraph: _Optional[str] = ..., comment: _Optional[str] = ...) -> None: ...

class ReviewAck(_message.Message):
    __slots__ = ("sequence", "paragraph", "status")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PARAGRAPH_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    paragraph: str
    status: str
    def __init__(self, sequence: _Optional[int] = ..., paragraph: _Optional[str] = ..., status: _Optional[str] = ...) -> None: ...
