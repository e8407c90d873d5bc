-- The completion window each batch was created with (a sidecar may set its own), so a
-- batch is only declared lost after its own window and the margin.
ALTER TABLE parts ADD COLUMN completion_window TEXT;
