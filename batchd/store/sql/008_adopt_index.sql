-- Parts that look for their remote file and batch first (after lost state) are found by
-- this index on each submit pass, without reading every pending part.
CREATE INDEX parts_adopt ON parts(adopt) WHERE adopt = 1;
